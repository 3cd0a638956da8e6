"""The meta-training method interface (dfml/methods/base.py) and the shared loop (dfml/methods/loop.py): every
registered algorithm implements it, logs its curve fields, trains the meta-model and resumes exactly (tiny jobs of
tests/methods/tiny_jobs.py); the workflow plans each by what it declares it needs.

PURER on the shared loop is compared with PURER's iterations computed directly in this file (no PurerTrainer,
no loop), on the running machine, so the exact comparison holds on any machine whatever its arithmetic.
"""

from __future__ import annotations

import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.evaluation.scoring import learner_scorer
from dfml.evaluation.selection import BestModels
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.meta import build_learner, meta_batch_loss
from dfml.methods.base import ALGORITHMS, MetaTrainingMethod, MethodInputs, NonFiniteLoss, StepLog, method_class
from dfml.methods.loop import Schedule, StopRequested, resume, train
from dfml.methods.purer import (EpisodeCurriculum, PurerMethod, gather_task, sample_pseudo_tasks,
                                sample_task_indices)
from dfml.models.access import ACCESS
from dfml.models.fusion import build_meta_model
from tiny_jobs import QUERY, SHOT, SIZE, WAY, contract_inputs, make_pool

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULE = Schedule(iterations=9, eval_every=3, checkpoint_every=4)
PROTOCOLS = {"test1": 1, "test2": 2}
VARIANTS = {"eci": {"eci": True, "warmup": 2, "patience": 1}, "ei": {"eci": False}}
LAMBDA_ADV, META_BATCH, OUTER_LR, INNER_LR, GENERATOR_SEED = 10.0, 2, 1e-3, 0.1, 11


def val_episodes():
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(WAY)
    return [SimpleNamespace(support_x=torch.randn(WAY * SHOT, 1, SIZE, SIZE, generator=gen),
                            support_y=labels.repeat_interleave(SHOT),
                            query_x=torch.randn(WAY * QUERY, 1, SIZE, SIZE, generator=gen),
                            query_y=labels.repeat_interleave(QUERY)) for _ in range(4)]


def purer_start():
    """The run's starting state: pool, pseudo data, meta-model (the pool average), learner."""
    pool = make_pool()
    pseudo = PseudoDataset.for_pool([m.qualified_classes for m in pool], (1, SIZE, SIZE), shots=SHOT, queries=QUERY,
                                    seed=3)
    model = build_meta_model([m.model for m in pool], "average", way=WAY, in_channels=1, image_size=SIZE, width=4,
                             seed=5)
    return pool, pseudo, model, build_learner("maml", inner_lr=INNER_LR)


def evaluator(learner, model, params):
    episodes = val_episodes()

    def evaluate():
        return {name: sum(learner_scorer(learner, model, params, steps=steps)(e) for e in episodes) / len(episodes)
                for name, steps in PROTOCOLS.items()}

    return evaluate


def build_purer(variant: str, method_weighting: str | None = None) -> tuple[PurerMethod, callable]:
    """PURER built through the interface like dfml.metatrain.run_job builds it (inversion settings from their
    defaults: official member weighting, unless the method's entry names its own)."""
    pool, pseudo, model, learner = purer_start()
    own = {} if method_weighting is None else {"member_weighting": method_weighting}
    settings = {"metatrain": {"way": WAY, "query": QUERY, "meta_batch": META_BATCH, "outer_lr": OUTER_LR,
                              "iterations": SCHEDULE.iterations, "eval_every": SCHEDULE.eval_every,
                              "checkpoint_every": SCHEDULE.checkpoint_every},
                "inversion": {"weights": {}, "engine": "sequential"},
                "method": {"algorithm": "purer", **VARIANTS[variant], **own}}
    inputs = MethodInputs(settings, SHOT, pool, pseudo, model, learner, "cpu", seed=GENERATOR_SEED)
    method = method_class("purer").build(inputs)
    return method, evaluator(learner, method.meta_model, method.params)


def curve_row(log: StepLog | None, val: dict | None) -> dict:
    row = {"iteration": 0} if log is None else {
        "iteration": log.iteration, "meta_loss": log.meta_loss, "meta_accuracy": log.meta_accuracy,
        **{k: int(v) if isinstance(v, bool) else v for k, v in log.values.items()}}
    row.update({f"val_{k}": v for k, v in (val or {}).items()})
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def direct_purer_run(variant: str, member_weighting: str = "official") -> SimpleNamespace:
    """PURER's meta-iterations (METHODS.md 2.3-2.5) computed directly from their parts, with meta-val selection at
    the schedule's evaluations: what the shared loop must reproduce exactly."""
    pool, pseudo, model, learner = purer_start()
    engine = InversionEngine([(m.model, m.qualified_classes) for m in pool], pseudo, InversionWeights(),
                             mode="sequential", member_weighting=member_weighting)
    params = dict(model.named_parameters())
    meta_optimizer = torch.optim.Adam(params.values(), lr=OUTER_LR)
    generator = torch.Generator().manual_seed(GENERATOR_SEED)
    eci = VARIANTS[variant]
    curriculum = EpisodeCurriculum(eci.get("warmup", 4000), eci.get("patience", 6), eci["eci"])
    evaluate = evaluator(learner, model, params)
    best = {name: {"iteration": 0, "accuracy": -math.inf, "model": None} for name in PROTOCOLS}

    def select(iteration: int, val: dict[str, float]) -> None:
        for name, accuracy in val.items():
            if accuracy > best[name]["accuracy"]:
                best[name] = {"iteration": iteration, "accuracy": accuracy,
                              "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    val = evaluate()
    select(0, val)
    rows = [curve_row(None, val)]
    for iteration in range(1, SCHEDULE.iterations + 1):
        images = pseudo.images
        inversion, terms = engine.loss(images, generator)
        objective, outer_value, adversarial = inversion, float("nan"), curriculum.consume()
        if adversarial:
            task = gather_task(images, sample_task_indices(*images.shape[:2], WAY, SHOT, QUERY, generator), SHOT)
            outer, _ = learner.task_loss(model, params, task, training=True)
            objective, outer_value = inversion - LAMBDA_ADV * outer, float(outer.detach())
        (images.grad,) = torch.autograd.grad(objective, [images])
        pseudo.optimizer.step()
        images.grad = None
        tasks = sample_pseudo_tasks(images.detach(), META_BATCH, WAY, SHOT, QUERY, generator)
        meta_loss, accuracy = meta_batch_loss(learner, model, params, tasks, training=True, reduction="sum")
        meta_optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        meta_optimizer.step()
        armed = curriculum.observe(iteration, float(accuracy))
        val = evaluate() if SCHEDULE.evaluates(iteration) else None
        if val is not None:
            select(iteration, val)
        log = StepLog(iteration, float(meta_loss.detach()), float(accuracy), 0.0, {
            "inversion_loss": float(terms["total"].sum()), "inversion_ce": float(terms["ce"].mean()),
            "inversion_bn": float(terms["bn"].mean()), "adversarial": adversarial,
            "adversarial_outer_loss": outer_value, "eci_armed": armed})
        rows.append(curve_row(log, val))
    return SimpleNamespace(rows=rows, best=best, model=model.state_dict(), pseudo=pseudo.images.detach())


def assert_equals_the_direct_run(direct: SimpleNamespace, method: PurerMethod, rows: list[dict],
                                 best: BestModels) -> None:
    assert rows == direct.rows
    assert {k: (e["iteration"], e["accuracy"]) for k, e in best.entries.items()} == \
        {k: (e["iteration"], e["accuracy"]) for k, e in direct.best.items()}
    for key, value in method.meta_model.state_dict().items():
        assert torch.equal(value, direct.model[key]), key
    assert torch.equal(method.trainer.pseudo.images.detach(), direct.pseudo)
    for protocol, entry in best.entries.items():
        for key, value in entry["model"].items():
            assert torch.equal(value, direct.best[protocol]["model"][key]), (protocol, key)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_shared_loop_drives_purer_exactly_like_a_direct_computation(variant, tmp_path):
    method, evaluate = build_purer(variant)
    rows, best = [], BestModels(list(PROTOCOLS))
    accuracies = train(method, SCHEDULE, checkpoint_path=tmp_path / "c.safetensors", fingerprint="f",
                       evaluate=evaluate, best=best, on_log=lambda log, val: rows.append(curve_row(log, val)))
    assert accuracies == best.accuracies()
    assert method.trainer.engine.member_weighting == "official"
    assert_equals_the_direct_run(direct_purer_run(variant), method, rows, best)
    if variant == "eci":
        assert [row["adversarial"] for row in rows[1:4]] == [0, 0, 1]  # the first push ends the warm-up
        # the comparison sees a change of setting: with equal member weights the pushes land elsewhere
        assert not torch.equal(method.trainer.pseudo.images.detach(), direct_purer_run(variant, "equal").pseudo)


def test_a_methods_own_member_weighting_replaces_the_inversions(tmp_path):
    """purer_equal beside purer in one run (issue 30): the entry's member_weighting drives its inversion steps."""
    method, evaluate = build_purer("eci", method_weighting="equal")
    rows, best = [], BestModels(list(PROTOCOLS))
    train(method, SCHEDULE, checkpoint_path=tmp_path / "c.safetensors", fingerprint="f", evaluate=evaluate,
          best=best, on_log=lambda log, val: rows.append(curve_row(log, val)))
    assert method.trainer.engine.member_weighting == "equal"
    assert torch.equal(method.trainer.pseudo.images.detach(), direct_purer_run("eci", "equal").pseudo)


def test_sigterm_then_resume_through_the_interface_finishes_like_the_direct_run(tmp_path):
    checkpoint = tmp_path / "c.safetensors"
    method, evaluate = build_purer("eci")
    rows, best = [], BestModels(list(PROTOCOLS))

    def on_log(log, val):
        rows.append(curve_row(log, val))
        if log is not None and log.iteration == 6:  # mid-way, not a checkpoint iteration
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StopRequested, match="stopped by signal 15 after meta-iteration 6"):
        train(method, SCHEDULE, checkpoint_path=checkpoint, fingerprint="f", evaluate=evaluate, best=best,
              on_log=on_log)
    messages = []
    method, evaluate = build_purer("eci")  # a new process
    best = BestModels(list(PROTOCOLS))
    assert not resume(checkpoint, method, best, "another", log=messages.append)
    assert messages[-1].endswith("fingerprint differs; starting over") and method.iteration == 0
    assert resume(checkpoint, method, best, "f", log=messages.append)
    assert method.iteration == 6 and messages[-1] == f"resuming from {checkpoint} at meta-iteration 6"
    train(method, SCHEDULE, checkpoint_path=checkpoint, fingerprint="f", evaluate=evaluate, best=best,
          on_log=lambda log, val: rows.append(curve_row(log, val)))
    assert_equals_the_direct_run(direct_purer_run("eci"), method, rows, best)


class Diverging(MetaTrainingMethod):
    """A toy method whose meta loss turns nan at its third iteration."""

    algorithm, needs_pseudo_data, access = "diverging", False, "white_box"

    def __init__(self):
        self.iteration, self.meta_model = 0, torch.nn.Linear(2, 2)

    @classmethod
    def build(cls, inputs):
        return cls()

    def step(self):
        self.iteration += 1
        return StepLog(self.iteration, float("nan") if self.iteration == 3 else 1.0, 0.5, 0.0)

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]


def test_the_loop_stops_on_a_nan_meta_loss_naming_the_iteration(tmp_path):
    rows = []
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at meta-iteration 3 \(term meta loss\)"):
        train(Diverging(), Schedule(10, 5, 5), checkpoint_path=tmp_path / "c.safetensors", fingerprint="f",
              evaluate=lambda: {"test1": 0.5}, best=BestModels(["test1"]), on_log=lambda log, val: rows.append(log))
    assert [log.iteration for log in rows[1:]] == [1, 2]


class Timed(Diverging):
    """A toy method whose every meta-iteration reports 1.5 s of wall time."""

    def step(self):
        self.iteration += 1
        return StepLog(self.iteration, 1.0, 0.5, 1.5)


def test_a_time_budget_stops_meta_training_evaluated_and_checkpointed_and_counts_a_resumed_runs_time(tmp_path):
    rows, evaluated, late, checkpoint = [], [], [], tmp_path / "c.safetensors"
    schedule = Schedule(100, eval_every=10, checkpoint_every=10, time_budget=5.0)

    def evaluate():
        evaluated.append(len(rows))
        return {"test1": 0.5}

    def run(method, spent=0.0):
        train(method, schedule, checkpoint_path=checkpoint, fingerprint="f", evaluate=evaluate,
              best=BestModels(["test1"]), on_log=lambda log, val: rows.append((log, val)), spent=spent,
              on_late_evaluation=lambda iteration, val: late.append((iteration, val)), log=lambda message: None)

    run(Timed())
    assert [log.iteration for log, _ in rows[1:]] == [1, 2, 3]  # 4.5 s; the 4th would end at 6.0 s: abandoned
    assert late == [(3, {"test1": 0.5})] and load_checkpoint(checkpoint)["iteration"] == 3
    method = Timed()
    method.iteration = 3  # a run resumed at 3 with 3.0 s spent has one iteration of budget left
    rows.clear()
    run(method, spent=3.0)
    assert [log.iteration for log, _ in rows] == [4]
    assert not Schedule(100, 10, 10).finished(99, spent=1e9) and Schedule(100, 10, 10).finished(100, 0.0)


def test_iterations_pinned_from_a_time_budgeted_run_replay_it_exactly(tmp_path):
    """The budget ends a run after an evaluated, checkpointed iteration N; a run told to do N iterations and
    given no budget evaluates and checkpoints at the same iterations (so it selects the same models)."""
    def run(schedule, checkpoint):
        rows = []  # (iteration, its meta-val scores or None); a late evaluation fills in its iteration's row
        train(Timed(), schedule, checkpoint_path=checkpoint, fingerprint="f", evaluate=lambda: {"test1": 0.5},
              best=BestModels(["test1"]), on_log=lambda log, val: rows.append((log and log.iteration, val)),
              on_late_evaluation=lambda iteration, val: rows.__setitem__(-1, (iteration, val)),
              log=lambda message: None)
        return rows, load_checkpoint(checkpoint)["iteration"]

    budgeted = run(Schedule(100, eval_every=3, checkpoint_every=3, time_budget=7.0), tmp_path / "a.safetensors")
    assert budgeted[1] == 4  # 6.0 s after the 4th; the 5th would end at 7.5 s: abandoned
    assert [iteration for iteration, val in budgeted[0] if val] == [None, 3, 4]
    assert run(Schedule(4, eval_every=3, checkpoint_every=3), tmp_path / "b.safetensors") == budgeted


def test_a_resumed_runs_curve_says_how_much_of_the_time_budget_is_spent(tmp_path):
    from dfml.metatrain import CurveWriter

    paths = [tmp_path / "curve.csv", tmp_path / "copy.curve.csv"]
    curve = CurveWriter(paths, None, (), ["test1"])
    assert curve.spent == 0.0
    curve.append(None, {"test1": 0.2})
    for iteration in (1, 2, 3):
        curve.append(StepLog(iteration, 1.0, 0.5, 1.25 * iteration), None)
    resumed = CurveWriter(paths, 2, (), ["test1"])  # the checkpoint was at 2: iteration 3's time is lost
    assert resumed.spent == 1.25 + 2.5
    assert paths[0].read_text().count("\n") == 4  # header, 0, 1, 2


def test_meta_val_selection_keeps_only_strict_improvements_per_protocol():
    best, model = BestModels(["a", "b"]), torch.nn.Linear(1, 1)
    assert best.offer(0, {"a": 0.5, "b": 0.5}, model) == ["a", "b"]
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert best.offer(4, {"a": 0.5, "b": 0.6}, model) == ["b"]
    assert best.entries["a"]["iteration"] == 0 and best.entries["b"]["iteration"] == 4
    assert float(best.entries["b"]["model"]["weight"]) == 3.0 != float(best.entries["a"]["model"]["weight"])


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_registered_algorithm_implements_the_interface(algorithm):
    cls = method_class(algorithm)
    assert issubclass(cls, MetaTrainingMethod) and cls.algorithm == algorithm
    assert isinstance(cls.needs_pseudo_data, bool) and cls.access in ACCESS
    assert not getattr(cls, "__abstractmethods__", None)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_logs_its_curve_fields_trains_the_meta_model_and_resumes_exactly(algorithm, tmp_path):
    cls = method_class(algorithm)
    reference = cls.build(contract_inputs(algorithm))
    before = {k: v.detach().clone() for k, v in reference.params.items()}
    logs = [reference.step() for _ in range(4)]
    assert [log.iteration for log in logs] == [1, 2, 3, 4] and reference.iteration == 4
    assert all(set(log.values) == set(cls.curve_fields) and math.isfinite(log.meta_loss) for log in logs)
    assert any(not torch.equal(before[k], v) for k, v in reference.params.items())  # it trains the meta-model
    assert set(reference.params) == {k for k, _ in reference.meta_model.named_parameters()}

    first = cls.build(contract_inputs(algorithm))
    for _ in range(2):
        first.step()
    save_checkpoint(tmp_path / "c.safetensors", first.state_dict())  # its state is a checkpoint (no pickle)
    resumed = cls.build(contract_inputs(algorithm))
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.safetensors"))
    assert resumed.iteration == 2
    resumed_logs = [resumed.step() for _ in range(2)]
    for log, expected in zip(resumed_logs, logs[2:]):  # the same curve (memory, triggers, API budget included)
        assert (log.meta_loss, log.meta_accuracy) == (expected.meta_loss, expected.meta_accuracy)
        def same(values):  # nan never equals itself; wall times differ between runs
            return {k: v for k, v in values.items() if v == v and not k.endswith("seconds")}

        assert same(log.values) == same(expected.values)
    for key, value in reference.meta_model.state_dict().items():
        assert torch.equal(value, resumed.meta_model.state_dict()[key]), key


def test_methods_declare_what_they_need():
    assert PurerMethod.needs_pseudo_data and PurerMethod.access == "white_box"
    bidfmkd = method_class("bidfmkd")
    assert not bidfmkd.needs_pseudo_data and bidfmkd.access == "black_box"
    assert not method_class("taco").needs_pseudo_data and method_class("taco").access == "white_box"
    with pytest.raises(ValueError, match="unknown meta-training algorithm 'dro'; known: bidfmkd, free, purer, taco, tgr"):
        method_class("dro")


def test_the_schema_has_a_settings_block_for_every_registered_algorithm_and_names_them_nowhere_else():
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "params.schema.yaml").read_text())
    assert set(schema["definitions"]["algorithms"]) == set(ALGORITHMS)
    for name, block in schema["definitions"]["algorithms"].items():
        assert block["properties"]["algorithm"] == {"const": name} and block["additionalProperties"] is False
    # the blocks are the one place an algorithm is written: dfml.config applies the entry's block
    assert schema["definitions"]["method"]["properties"] == {"algorithm": {"type": "string"}}
    assert "allOf" not in schema["definitions"]["method"]


def test_a_methods_entry_gets_its_algorithms_defaults_and_checks_in_words():
    from dfml.config import ParamsError, check_method_algorithms

    params = {"methods": {"t": {"algorithm": "tgr", "groups": 3}, "p": {"algorithm": "purer"}}}
    check_method_algorithms(params)  # what the Snakefile calls before Snakemake's validation: fills in place
    assert params["methods"]["t"]["groups"] == 3 and params["methods"]["t"]["grouping"] == "dissimilar"
    assert params["methods"]["t"]["train_steps"] == 5 and params["methods"]["p"]["train_steps"] == 1
    absent = {}
    check_method_algorithms(absent)  # no methods: the schema's default entries, with their blocks' defaults
    assert absent["methods"]["purer_ei"] == {"algorithm": "purer", "eci": False, "train_steps": 1, "warmup": 4000,
                                             "patience": 6, "adversarial_step": "shared"}
    with pytest.raises(ParamsError, match=r"invalid value at 'methods.t.groups': 0 is less than the minimum of 1"):
        check_method_algorithms({"methods": {"t": {"algorithm": "tgr", "groups": 0}}})
    with pytest.raises(ParamsError, match=r"methods.t.eci is not a setting of algorithm 'tgr'"):
        check_method_algorithms({"methods": {"t": {"algorithm": "tgr", "eci": True}}})
    with pytest.raises(ParamsError, match=r"methods.t.algorithm: unknown algorithm 'dro'; known: bidfmkd, free"):
        check_method_algorithms({"methods": {"t": {"algorithm": "dro"}}})


TOY_METHOD = '''
import torch

from dfml.methods.base import MetaTrainingMethod, StepLog


class Toy(MetaTrainingMethod):
    algorithm, needs_pseudo_data, access = "toy", False, "white_box"

    def __init__(self, model):
        self.iteration, self.meta_model = 0, model

    @classmethod
    def build(cls, inputs):
        return cls(inputs.meta_model)

    def step(self):
        self.iteration += 1
        return StepLog(self.iteration, 0.0, 0.0, 0.0)

    def state_dict(self):
        return {"iteration": self.iteration}

    def load_state_dict(self, state):
        self.iteration = state["iteration"]
'''


@pytest.mark.slow
def test_the_metatrain_rule_takes_the_pseudo_data_only_for_a_method_that_needs_it(tmp_path):
    """A toy algorithm without pseudo data, registered in a copy of the project: its metatrain job plans no
    inversion and gets no --pseudo; PURER's gets both."""
    from conftest import copy_project, run_snakemake, tiny_omniglot_params

    params = tiny_omniglot_params(3, pretrain_epochs=1, iterations=2, eval_every=1, checkpoint_every=1,
                                  val_episodes=2)
    params["methods"] = {"purer": {"algorithm": "purer"}, "toy": {"algorithm": "toy"}}
    project = copy_project(tmp_path, params)
    (project / "dfml" / "methods" / "toy.py").write_text(TOY_METHOD)
    base = project / "dfml" / "methods" / "base.py"
    base.write_text(base.read_text().replace('    "purer": ("dfml.methods.purer", "PurerMethod"),\n',
                                             '    "purer": ("dfml.methods.purer", "PurerMethod"),\n'
                                             '    "toy": ("dfml.methods.toy", "Toy"),\n'))
    schema_path = project / "workflow" / "schemas" / "params.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["definitions"]["algorithms"]["toy"] = {"type": "object", "additionalProperties": False,
                                                  "properties": {"algorithm": {"const": "toy"}}}
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))

    def planned(method: str) -> str:
        proc = run_snakemake(project, "-n", "-p", f"results/metatrain/tiny/{method}/seed0/shot1/curve.csv")
        return proc.stdout + proc.stderr

    toy, purer = planned("toy"), planned("purer")
    assert "rule metatrain_no_pseudo:" in toy and "rule invert_pool:" not in toy and "pseudo.safetensors" not in toy
    assert "pseudo_final" not in toy and "rule metatrain:" in purer and "pseudo_final.safetensors" in purer
    assert "--method toy" in toy and "--pseudo" not in toy
    assert "rule invert_pool:" in purer and "--pseudo results/synthetic/tiny/seed0/pseudo.safetensors" in purer


@pytest.mark.slow
def test_a_black_box_scenario_plans_only_black_box_methods_and_no_fusion(tmp_path):
    """On a pool exposed as APIs the workflow trains bidfmkd (through metatrain_no_pseudo, without pseudo data)
    and neither PURER nor the parameter-fusion baselines, which would need the members' weights."""
    from conftest import copy_project, run_snakemake, tiny_omniglot_params

    params = tiny_omniglot_params(3, pretrain_epochs=1, iterations=2, eval_every=1, checkpoint_every=1,
                                  val_episodes=2)
    params["scenarios"]["tiny"]["access"] = "black_box"
    params["methods"]["bidfmkd"] = {"algorithm": "bidfmkd"}
    project = copy_project(tmp_path, params)
    proc = run_snakemake(project, "-n", "-p")
    plan = proc.stdout + proc.stderr
    assert "rule metatrain_no_pseudo:" in plan and "--method bidfmkd" in plan
    assert "--method purer" not in plan and "rule invert_pool:" not in plan
    assert "results/metatest/tiny/average" not in plan and "results/metatest/tiny/random" in plan


@pytest.mark.slow
def test_a_run_whose_methods_all_need_pseudo_data_plans_no_metatrain_no_pseudo(tmp_path):
    """Methods that all need pseudo data: metatrain_no_pseudo matches no method (an empty wildcard constraint
    must match nothing, not everything, or the two rules would be ambiguous); the shipped params (with TACO)
    plan both rules, unambiguously."""
    from conftest import copy_project, run_snakemake

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (tmp_path / "shipped").mkdir(), (tmp_path / "purer_only").mkdir()
    proc = run_snakemake(copy_project(tmp_path / "shipped", params), "-n")
    plan = proc.stdout + proc.stderr
    assert "metatrain " in plan and "metatrain_no_pseudo" in plan and "AmbiguousRule" not in plan
    params["run_methods"] = ["purer", "purer_ei"]
    params["report"] = {"comparisons": []}  # the shipped pairs name the methods left out
    proc = run_snakemake(copy_project(tmp_path / "purer_only", params), "-n")
    plan = proc.stdout + proc.stderr
    assert "metatrain " in plan and "metatrain_no_pseudo" not in plan and "AmbiguousRule" not in plan


class Counting(Diverging):
    """A toy method whose meta-model's weights hold the number of its last meta-iteration."""

    def step(self):
        self.iteration += 1
        with torch.no_grad():
            self.meta_model.weight.fill_(self.iteration)
        return StepLog(self.iteration, 1.0, 0.5, 0.0)


def test_the_loop_keeps_the_meta_model_at_the_iterations_asked_before_their_checkpoint(tmp_path):
    checkpoint, kept = tmp_path / "c.safetensors", {}

    def on_keep(iteration):
        kept[iteration] = (float(method.meta_model.weight[0, 0].detach()), checkpoint.is_file()
                           and load_checkpoint(checkpoint)["iteration"])

    method = Counting()
    train(method, Schedule(10, 5, 4, keep=frozenset({1, 4, 7, 10, 12})), checkpoint_path=checkpoint,
          fingerprint="f", evaluate=lambda: {"test1": 0.5}, best=BestModels(["test1"]), on_log=lambda log, val: None,
          on_keep=on_keep)
    # the model of that very iteration; the checkpoint of a kept iteration is written after it (4: still none)
    assert kept == {1: (1.0, False), 4: (4.0, False), 7: (7.0, 4), 10: (10.0, 8)}
