"""PURER (dfml/methods/purer.py): ECI and its switch, the adversarial steps, the official member weighting against
hand-computed losses, refused no-op options, exact kill-and-resume, NaN stops, the meta-model's start."""

import math

import pytest
import torch
import yaml

from conftest import REPO_ROOT, params_for_own_methods
from dfml.config import ParamsError, check_params
from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.inversion.losses import jitter, member_inversion_terms, weighted_total
from dfml.inversion.pseudo_data import gather_member_view
from dfml.meta import build_learner
from dfml.methods.purer import (EpisodeCurriculum, NonFiniteLoss, PurerSettings, PurerTrainer, gather_task,
                                sample_pseudo_tasks, sample_task_indices)
from dfml.models import build_model
from dfml.models.fusion import build_meta_model

WAY, SHOT, QUERY, SIZE = 3, 1, 2, 16


pytestmark = pytest.mark.usefixtures("single_thread")


def make_pool(n_members=3, classes_per_member=3, seed=0):
    torch.manual_seed(seed)
    members = []
    for m in range(n_members):
        model = build_model("conv4", classes_per_member, 1, SIZE, width=4)
        with torch.no_grad():  # distinct, non-trivial running statistics per teacher
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
        members.append((model.eval(), [f"c{m * classes_per_member + k}" for k in range(classes_per_member)]))
    return members


def make_trainer(iterations=6, eci=True, warmup=2, patience=2, lambda_adv=10.0, seed=0, adversarial_step="shared",
                 adversarial_lr=None, learner="maml"):
    members = make_pool()
    pseudo = PseudoDataset.for_pool([c for _, c in members], (1, SIZE, SIZE), shots=SHOT, queries=QUERY, seed=seed)
    engine = InversionEngine(members, pseudo, InversionWeights(), mode="sequential")
    meta = build_meta_model([m for m, _ in members], "average", way=WAY, in_channels=1, image_size=SIZE, width=4)
    settings = PurerSettings(way=WAY, shot=SHOT, query=QUERY, meta_batch=2, iterations=iterations, eci=eci,
                             lambda_adv=lambda_adv, warmup=warmup, patience=patience, eval_every=3, checkpoint_every=3,
                             adversarial_step=adversarial_step, adversarial_lr=adversarial_lr)
    return PurerTrainer(engine, pseudo, meta, build_learner(learner, inner_lr=0.1), settings, seed=seed)


def test_curriculum_arms_at_the_end_of_warmup_then_after_patience_stagnant_iterations():
    eci = EpisodeCurriculum(warmup=3, patience=2)
    armed = [eci.observe(t, acc) for t, acc in enumerate([0.9, 0.9, 0.5, 0.4, 0.5, 0.5, 0.6, 0.6, 0.6], start=1)]
    # t=1,2 warm-up (never); t=3 armed unconditionally (resets); t=4 sets the max 0.4; t=5 new max 0.5;
    # t=6 stagnant 1; t=7 new max 0.6; t=8 stagnant 1; t=9 stagnant 2 -> armed
    assert armed == [False, False, True, False, False, False, False, False, True]
    assert eci.consume() is True and eci.consume() is False


def test_curriculum_is_off_for_plain_episode_inversion():
    eci = EpisodeCurriculum(warmup=0, patience=1, enabled=False)
    assert not any(eci.observe(t, 0.0) for t in range(1, 20))


def test_pseudo_tasks_have_the_right_shapes_and_come_from_distinct_classes():
    images = torch.arange(6 * 5, dtype=torch.float32).view(6, 5, 1, 1, 1).expand(6, 5, 1, 2, 2).clone()
    gen = torch.Generator().manual_seed(0)
    indices = sample_task_indices(6, 5, 3, 2, 3, gen)
    assert len(set(indices.classes.tolist())) == 3
    task = gather_task(images, indices, shot=2)
    assert task.support_x.shape == (6, 1, 2, 2) and task.query_x.shape == (9, 1, 2, 2)
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    for k, cls in enumerate(indices.classes.tolist()):
        values = torch.cat([task.support_x[task.support_y == k], task.query_x[task.query_y == k]]).flatten().unique()
        assert set((values // 5).long().tolist()) == {cls}  # every image of label k comes from pseudo class cls
        assert len(values) == 5  # 2 support + 3 query slots, all distinct
    with pytest.raises(ValueError, match="need 6 slots per class, have 5"):
        sample_pseudo_tasks(images, 1, 3, 3, 3, gen)


def test_adversarial_step_increases_the_pseudo_task_outer_loss():
    trainer = make_trainer(warmup=0, lambda_adv=1000.0)
    trainer.engine.weights = InversionWeights(ce=0.0, bn=0.0, tv=0.0, l2=0.0)  # isolate the adversarial term
    trainer.curriculum.armed = True
    before_images = trainer.pseudo.images.detach().clone()
    trainer.pseudo_data_step()
    task_indices = trainer.last_adversarial_task
    assert task_indices is not None

    def outer(images):
        task = gather_task(images, task_indices, SHOT)
        loss, _ = trainer.learner.task_loss(trainer.model, trainer.params, task, training=True)
        return float(loss.detach())

    assert outer(trainer.pseudo.images.detach()) > outer(before_images) + 1e-3


def test_a_separate_adversarial_step_leaves_the_inversion_moments_as_plain_inversion_would():
    separate = make_trainer(warmup=0, adversarial_step="separate")
    plain = make_trainer(warmup=0, eci=False)
    shared = make_trainer(warmup=0)
    separate.curriculum.armed = shared.curriculum.armed = True
    for trainer in (separate, plain, shared):
        trainer.pseudo_data_step()
    moments = [t.pseudo.optimizer.state[t.pseudo.images] for t in (separate, plain, shared)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(moments[0][key], moments[1][key])  # the inversion's Adam saw only the inversion
        assert not torch.equal(moments[2][key], moments[1][key])  # PURER's shared step: it saw the push too
    pushed = separate.last_adversarial_task
    moved = (separate.pseudo.images - plain.pseudo.images).abs().flatten(2).amax(2) > 0  # [classes, slots]
    expected = torch.zeros_like(moved)
    expected[pushed.classes[:, None], pushed.slots] = True
    assert torch.equal(moved, expected)  # the adversarial Adam moved exactly the pushed task's images


def float64_trainer(member_weighting: str, scale: float = 1.0) -> PurerTrainer:
    """A PURER trainer in float64 whose pseudo-data step is forced (``curriculum.armed``); ``scale`` multiplies the
    whole pseudo-data objective (every inversion weight and lambda_adv), which Adam's update ignores but for eps."""
    members = [(model.double(), classes) for model, classes in make_pool()]
    pseudo = PseudoDataset.for_pool([c for _, c in members], (1, SIZE, SIZE), shots=SHOT, queries=QUERY, seed=0)
    pseudo.images = torch.nn.Parameter(pseudo.images.detach().double())
    pseudo.make_optimizer()
    weights = InversionWeights(ce=scale, bn=0.01 * scale, tv=1e-4 * scale, l2=1e-5 * scale)
    engine = InversionEngine(members, pseudo, weights, mode="sequential", member_weighting=member_weighting)
    meta = build_meta_model([m for m, _ in members], "average", way=WAY, in_channels=1, image_size=SIZE,
                            width=4).double()
    settings = PurerSettings(way=WAY, shot=SHOT, query=QUERY, meta_batch=2, eci=True, lambda_adv=10.0 * scale,
                             warmup=0, patience=1)
    return PurerTrainer(engine, pseudo, meta, build_learner("maml", inner_lr=0.1), settings, seed=0)


PUSHES = (True, False, True, True, False, True)  # which pseudo-data steps carry ECI's push


def pseudo_data_steps(trainer: PurerTrainer, objective) -> list[float]:
    """Takes the trainer's pseudo-data steps (ECI's push where PUSHES says) and, beside them, steps of an Adam of the
    test's own on a copy of the pseudo images with the gradient ``objective(images, generator, push)`` (the
    generator in the trainer's state before the step); the largest pixel difference after each step."""
    images = torch.nn.Parameter(trainer.pseudo.images.detach().clone())
    adam = torch.optim.Adam([images], lr=trainer.pseudo.lr)
    differences = []
    for push in PUSHES:
        generator = torch.Generator()
        generator.set_state(trainer.generator.get_state())
        trainer.curriculum.armed = push
        trainer.pseudo_data_step()
        adam.zero_grad()
        images.grad = objective(images, generator, push)
        adam.step()
        differences.append(float((trainer.pseudo.images.detach() - images.detach()).abs().max()))
    return differences


def adversarial_outer_loss(trainer: PurerTrainer, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    indices = sample_task_indices(*images.shape[:2], WAY, SHOT, QUERY, generator)
    return trainer.learner.task_loss(trainer.model, trainer.params, gather_task(images, indices, SHOT),
                                     training=True)[0]


def test_official_member_weighting_steps_the_pseudo_data_on_the_hand_computed_n_minus_j_loss():
    """METHODS 2.3: member j's L_inv counts N - j times in the loss whose gradient (minus lambda_adv times the outer
    loss when ECI pushes) feeds the pseudo data's Adam."""
    trainer = float64_trainer("official")
    w, n = trainer.engine.weights, trainer.engine.num_members

    def official_objective(images, generator, push):
        jittered = jitter(images, w.jitter, generator, w.flip)
        loss = 0.0
        for j, member in enumerate(trainer.engine.members):
            view, targets = gather_member_view(jittered, member.positions)
            terms = member_inversion_terms(member.model, view, targets, w.first_bn_multiplier)
            loss = loss + (n - j) * weighted_total(*terms, w)
        if push:
            loss = loss - trainer.settings.lambda_adv * adversarial_outer_loss(trainer, images, generator)
        return torch.autograd.grad(loss, [images])[0]

    assert max(pseudo_data_steps(trainer, official_objective)) < 1e-10


def test_official_member_weighting_is_equal_weights_with_the_push_divided_by_n_minus_j():
    """Adam ignores a constant scale per disjoint slice (but for its eps, made negligible by scaling the whole
    objective), so the official run pushes slice j with lambda_adv / (N - j) (METHODS 2.3): 3.3, 5 and 10 here."""
    scale = 1e6
    official = float64_trainer("official", scale)
    equal = float64_trainer("equal", scale)
    n = equal.engine.num_members
    push_weight = torch.ones(equal.pseudo.num_classes, 1, 1, 1, 1, dtype=torch.float64)
    for j, member in enumerate(equal.engine.members):
        push_weight[member.positions] = equal.settings.lambda_adv / (n - j)

    def equal_objective(push_weights):
        def objective(images, generator, push):
            gradient = torch.autograd.grad(equal.engine.loss(images, generator)[0], [images])[0]
            if push:
                outer = adversarial_outer_loss(equal, images, generator)
                gradient = gradient - push_weights * torch.autograd.grad(outer, [images])[0]
            return gradient
        return objective

    assert max(pseudo_data_steps(official, equal_objective(push_weight))) < 1e-6
    unscaled = pseudo_data_steps(float64_trainer("official", scale), equal_objective(equal.settings.lambda_adv))
    assert min(unscaled) > 0.1  # equal weights with lambda_adv on every slice push elsewhere from the first step


def test_member_weighting_defaults_to_official_and_refuses_an_unknown_value():
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert base["inversion"]["member_weighting"] == "official"
    stated = {key: value for key, value in base["inversion"].items() if key != "member_weighting"}
    assert check_params({**base, "inversion": stated})["inversion"]["member_weighting"] == "official"
    assert check_params({**base, "inversion": {**stated, "member_weighting": "equal"}})["inversion"][
        "member_weighting"] == "equal"
    with pytest.raises(ParamsError, match=r"invalid value at 'inversion.member_weighting': 'n_minus_j' is not one "
                                          r"of \['official', 'equal'\]"):
        check_params({**base, "inversion": {**stated, "member_weighting": "n_minus_j"}})


def test_warmup_zero_makes_the_very_first_pseudo_data_step_adversarial():
    assert EpisodeCurriculum(warmup=0, patience=3).armed
    trainer = make_trainer(warmup=0, patience=50)
    log = trainer.step()
    assert log.adversarial and trainer.last_adversarial_task is not None
    assert not trainer.step().adversarial  # then patience applies


def test_the_separate_push_moves_the_task_by_its_own_step_size_and_ignores_lambda():
    def push(adversarial_lr, lambda_adv=10.0):
        trainer = make_trainer(warmup=0, adversarial_step="separate", adversarial_lr=adversarial_lr,
                               lambda_adv=lambda_adv)
        plain = make_trainer(warmup=0, eci=False)
        trainer.pseudo_data_step()
        plain.pseudo_data_step()
        task = trainer.last_adversarial_task
        return (trainer.pseudo.images - plain.pseudo.images)[task.classes[:, None], task.slots].abs()

    small, large = push(0.01), push(0.2)
    # Adam's first step moves each pixel by lr (up to its epsilon): the step size is the push's size
    assert torch.allclose(small.amax(), torch.tensor(0.01), rtol=1e-3)
    assert torch.allclose(large.amax(), torch.tensor(0.2), rtol=1e-3)
    assert torch.equal(push(0.05, lambda_adv=10.0), push(0.05, lambda_adv=0.1))  # lambda plays no part


def test_adversarial_lr_needs_the_separate_step():
    with pytest.raises(ValueError, match="adversarial_lr is the step size of the separate push"):
        PurerSettings(adversarial_lr=0.1)


def test_eci_with_first_order_maml_is_refused():
    with pytest.raises(ValueError, match="ECI cannot run with first-order MAML"):
        make_trainer(learner="fomaml")
    make_trainer(learner="fomaml", eci=False)  # EI needs no gradient into the images


def test_params_refuse_options_that_would_do_nothing():
    base = params_for_own_methods()

    def check(methods, learner="maml"):
        methods = {name: {"algorithm": "purer", **entry} for name, entry in methods.items()}
        return check_params({**base, "methods": methods, "metatrain": {**base["metatrain"], "learner": learner}})

    with pytest.raises(ParamsError, match=r"methods.sep.lambda_adv has no effect with adversarial_step: separate"):
        check({"sep": {"adversarial_step": "separate", "lambda_adv": 10.0}})
    with pytest.raises(ParamsError, match=r"methods.p.adversarial_lr only applies to adversarial_step: separate"):
        check({"p": {"adversarial_lr": 0.1}})
    with pytest.raises(ParamsError, match=r"methods.p: ECI cannot run with metatrain.learner fomaml"):
        check({"p": {"eci": True}}, learner="fomaml")
    check({"p": {"eci": False}}, learner="fomaml")
    assert check({"sep": {"adversarial_step": "separate", "adversarial_lr": 0.25}})["methods"]["sep"][
        "adversarial_lr"] == 0.25


def test_an_unknown_adversarial_step_is_refused():
    with pytest.raises(ValueError, match="adversarial_step must be one of"):
        PurerSettings(adversarial_step="both")


def test_kill_and_resume_keeps_the_separate_adversarial_moments(tmp_path):
    def trainer():
        return make_trainer(iterations=8, warmup=1, patience=1, adversarial_step="separate")

    reference = trainer()
    for _ in range(8):
        reference.step()
    first = trainer()
    for _ in range(5):
        first.step()
    save_checkpoint(tmp_path / "ckpt.safetensors", {"trainer": first.state_dict()})
    resumed = trainer()
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.safetensors")["trainer"])
    for _ in range(3):
        resumed.step()
    assert torch.equal(reference.pseudo.images, resumed.pseudo.images)


def test_non_adversarial_step_leaves_the_switch_and_meta_model_alone():
    trainer = make_trainer(eci=False)
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    _, adversarial, outer = trainer.pseudo_data_step()
    assert adversarial is False and math.isnan(outer)
    assert all(torch.equal(before[k], v) for k, v in trainer.params.items())  # the data step never moves theta


def test_training_steps_move_meta_model_and_data_and_log_eci_events():
    trainer = make_trainer(iterations=8, warmup=2, patience=1)
    logs = [trainer.step() for _ in range(8)]
    assert logs[1].eci_armed  # end of warm-up (iteration 2)
    assert logs[2].adversarial  # consumed by the next data step
    assert sum(log.adversarial for log in logs) >= 2
    assert all(math.isfinite(log.meta_loss) and log.seconds > 0 for log in logs)


def run_uninterrupted(n):
    trainer = make_trainer(iterations=n)
    for _ in range(n):
        trainer.step()
    return trainer


def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    reference = run_uninterrupted(8)
    first = make_trainer(iterations=8)
    for _ in range(5):
        first.step()
    save_checkpoint(tmp_path / "ckpt.safetensors", {"trainer": first.state_dict(), "best_accuracy": 0.25})
    del first  # "killed"
    resumed = make_trainer(iterations=8)
    state = load_checkpoint(tmp_path / "ckpt.safetensors")
    resumed.load_state_dict(state["trainer"])
    assert state["best_accuracy"] == 0.25 and resumed.iteration == 5
    for _ in range(3):
        resumed.step()
    for name, value in reference.params.items():
        assert torch.equal(value, resumed.params[name]), name
    assert torch.equal(reference.pseudo.images, resumed.pseudo.images)
    assert reference.curriculum.state_dict() == resumed.curriculum.state_dict()


def test_checkpoint_round_trips_nested_state_without_pickle(tmp_path):
    state = {"a": torch.arange(3), "b": {0: {"step": torch.tensor(2.0)}, 1: {}}, "c": [1, 2.5, "x", None],
             "d": float("-inf"), "e": {"f": (torch.ones(2), 3)}}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["a"], state["a"]) and back["b"][0]["step"] == 2.0 and back["b"][1] == {}
    assert back["c"] == [1, 2.5, "x", None] and back["d"] == float("-inf")
    assert torch.equal(back["e"]["f"][0], torch.ones(2)) and back["e"]["f"][1] == 3
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_nan_in_the_pseudo_data_stops_naming_iteration_member_and_term():
    trainer = make_trainer()
    with torch.no_grad():
        trainer.pseudo.images[4, 0, 0, 0, 0] = float("nan")  # class c4 belongs to member 1
    with pytest.raises(NonFiniteLoss, match=r"meta-iteration 1: inversion loss is nan for member 1 \(term \w+\)"):
        trainer.step()


def test_inf_in_the_meta_loss_stops_naming_the_term():
    trainer = make_trainer()
    with torch.no_grad():
        trainer.params["head.bias"][0] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"at meta-iteration 1 \(term meta outer loss\)"):
        trainer.step()


@pytest.mark.parametrize("init", ["average", "ota"])
def test_fusion_inits_refuse_a_pool_unlike_the_meta_model(init):
    pool = [build_model("conv4", 3, 1, SIZE, width=4), build_model("resnet10", 3, 1, SIZE, width=4)]
    with pytest.raises(ValueError, match=rf"{init} fuses parameters and needs a pool of conv4 members of width 4.*"
                                         r"\('resnet10', 4\).*init 'random'"):
        build_meta_model(pool, init, way=3, in_channels=1, image_size=SIZE, width=4)
    narrower = [build_model("conv4", 3, 1, SIZE, width=2)] * 2
    with pytest.raises(ValueError, match=r"width 4.*\('conv4', 2\)"):
        build_meta_model(narrower, init, way=3, in_channels=1, image_size=SIZE, width=4)
    with pytest.raises(ValueError, match=r"unknown meta-model init 'fedavg'; expected 'random' or one of \['average', 'ota'\]"):
        build_meta_model(pool, "fedavg", way=3, in_channels=1, image_size=SIZE, width=4)


def test_ota_init_is_the_aligned_mean_of_the_pool():
    from dfml.models.ota import ota_fuse

    members = [m for m, _ in make_pool(n_members=3)]
    meta = build_meta_model(members, "ota", way=WAY, in_channels=1, image_size=SIZE, width=4)
    fused = ota_fuse([m.state_dict() for m in members])
    for key, value in meta.state_dict().items():
        assert torch.equal(value, fused[key]), key
    average = build_meta_model(members, "average", way=WAY, in_channels=1, image_size=SIZE, width=4)
    assert not torch.equal(meta.backbone.blocks[0].conv.weight, average.backbone.blocks[0].conv.weight)


def test_average_init_is_the_parameter_mean_of_the_pool():
    members = make_pool(n_members=2)
    meta = build_meta_model([m for m, _ in members], "average", way=WAY, in_channels=1, image_size=SIZE, width=4)
    expected = (members[0][0].head.weight + members[1][0].head.weight) / 2
    assert torch.allclose(meta.head.weight, expected)
    assert meta.batch_stats_only
