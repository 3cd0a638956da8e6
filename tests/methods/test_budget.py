"""Equal time budgets (issue 27, point 1): what a method needs after the pool exists is charged to its budget,
and no run keeps more meta-iterations than its budget holds.

A toy method with controlled, deterministic costs per meta-iteration (a long "generation event" every few
iterations, short ones between) stands for the real ones, whose wall times vary from run to run:
tests/workflow/test_preemption.py runs the real methods through scripts/metatrain.py.
"""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch

from dfml.checkpoint import load_checkpoint
from dfml.evaluation.selection import BestModels
from dfml.metatrain import CurveWriter
from dfml.methods.base import MetaTrainingMethod, StepLog
from dfml.methods.loop import Schedule, StopRequested, budget_used, resume, train
from dfml.report import cost_markdown, plot_accuracy_vs_time, training_cost

PROTOCOLS = ["test1"]


class Uneven(MetaTrainingMethod):
    """Reports ``costs[i % len(costs)]`` seconds for its (i + 1)-th meta-iteration. Each step changes its
    meta-model and a moment tensor in place, as an optimiser does, and its state_dict hands out the live tensors:
    a loop that abandons an iteration must copy them before it, or the restored state is the abandoned one."""

    algorithm, needs_pseudo_data, access = "uneven", False, "white_box"

    def __init__(self, costs=(7.0, 1.0, 1.0, 1.0), stop_after: int | None = None):
        self.costs, self.stop_after = costs, stop_after
        self.iteration, self.meta_model = 0, torch.nn.Linear(2, 1, bias=False)
        self.moment = torch.zeros(2)
        with torch.no_grad():
            self.meta_model.weight.zero_()

    @classmethod
    def build(cls, inputs):
        return cls()

    def step(self):
        cost = self.costs[self.iteration % len(self.costs)]
        self.iteration += 1
        with torch.no_grad():
            self.moment.add_(1.0)
            self.meta_model.weight.add_(self.moment * (-1.0) ** self.iteration)
        if self.iteration == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption during this iteration
        return StepLog(self.iteration, 1.0, 0.5, cost)

    def state_dict(self):
        return {"iteration": self.iteration, "weight": self.meta_model.weight.data, "moment": self.moment}

    def load_state_dict(self, state):
        self.iteration = int(state["iteration"])
        with torch.no_grad():
            self.meta_model.weight.copy_(state["weight"])
            self.moment.copy_(state["moment"])


def score(method: Uneven) -> dict[str, float]:
    """A meta-val accuracy that depends on the meta-model, so that selection and late evaluations show."""
    return {"test1": float(torch.sigmoid(method.meta_model.weight.detach().sum()))}


def run(tmp_path, name: str, schedule: Schedule, method: Uneven | None = None, charged: float | None = None,
        resumed=None):
    """One run through the shared loop, its curve written as metatrain writes it; (method, best, curve path,
    checkpoint path). ``resumed``: continue from the checkpoint of an earlier run of that name."""
    method = method or Uneven()
    best = BestModels(PROTOCOLS)
    checkpoint = tmp_path / f"{name}.safetensors"
    paths = [tmp_path / f"{name}.csv", tmp_path / f"{name}.copy.csv"]
    if resumed:
        resumed = resume(checkpoint, method, best, "f", log=lambda message: None)
    curve = CurveWriter(paths, resumed.iteration if resumed else None, (), PROTOCOLS, charged_seconds=charged)
    train(method, schedule, checkpoint_path=checkpoint, fingerprint="f", evaluate=lambda: score(method), best=best,
          on_log=curve.append, on_late_evaluation=curve.add_evaluation, spent=budget_used(resumed, schedule, curve.spent),
          log=lambda message: None)
    return method, best, paths[0], checkpoint


def rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def charged_seconds(path) -> float:
    return sum(float(r["seconds"]) for r in rows(path) if r["seconds"])


COSTS = {"event first, then replays": (7.0, 1.0, 1.0, 1.0), "replays, then an event": (1.0, 1.0, 1.0, 9.5),
         "two kinds of event": (0.5, 12.0, 0.5, 3.0, 0.5)}


@pytest.mark.parametrize("costs", COSTS.values(), ids=COSTS.keys())
@pytest.mark.parametrize("budget", [0.4, 6.9, 7.0, 7.5, 8.0, 9.0, 11.0, 12.5, 16.25, 20.0, 31.0, 47.5])
def test_no_run_keeps_more_meta_iterations_than_its_budget_holds(tmp_path, costs, budget):
    """Checked only between meta-iterations, the budget let the one that crossed it run to its end (TACO used
    78 s of 60); now it is abandoned, and the run keeps exactly the iterations that fit."""
    method, _, curve, _ = run(tmp_path, "run", Schedule(100, eval_every=5, checkpoint_every=5, time_budget=budget),
                              Uneven(costs))
    kept = charged_seconds(curve)
    assert kept <= budget
    assert kept + costs[method.iteration % len(costs)] > budget  # the next one would not fit: nothing left unused
    assert [int(r["iteration"]) for r in rows(curve)] == list(range(method.iteration + 1))


@pytest.mark.parametrize("budget", [12.5, 19.5, 26.0])
def test_a_budgeted_run_is_the_run_its_pinned_iterations_replay(tmp_path, budget):
    """The last iteration kept is evaluated (its curve row gets its scores) and checkpointed, and the abandoned
    one leaves no trace: a run told to do that many iterations without a budget writes the same curve, selects
    the same models and ends in the same state."""
    budgeted, best, curve, checkpoint = run(tmp_path, "budgeted", Schedule(100, 5, 5, time_budget=budget))
    n = budgeted.iteration
    assert n % 5 != 0  # the last iteration kept was not evaluated when it ran
    pinned, pinned_best, pinned_curve, pinned_checkpoint = run(tmp_path, "pinned", Schedule(n, 5, 5))
    assert rows(curve) == rows(pinned_curve)
    assert rows(curve)[-1]["val_test1"] != ""
    assert torch.equal(budgeted.meta_model.weight, pinned.meta_model.weight)
    assert torch.equal(budgeted.moment, pinned.moment)
    assert best.entries["test1"]["iteration"] == pinned_best.entries["test1"]["iteration"]
    assert torch.equal(best.entries["test1"]["model"]["weight"], pinned_best.entries["test1"]["model"]["weight"])
    saved, replayed = load_checkpoint(checkpoint), load_checkpoint(pinned_checkpoint)
    assert saved["iteration"] == replayed["iteration"] == n
    assert torch.equal(saved["method"]["weight"], replayed["method"]["weight"])
    assert saved["budget_spent"] and not replayed["budget_spent"]


def test_a_budgeted_runs_rows_are_written_as_they_run_and_one_row_gets_its_late_scores(tmp_path):
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    curve = CurveWriter(paths, None, (), PROTOCOLS)
    curve.append(None, {"test1": 0.25})
    for iteration in (1, 2):
        curve.append(StepLog(iteration, 1.0, 0.5, 1.5), None)
    curve.add_evaluation(2, {"test1": 0.75})
    for path in paths:
        assert [r["val_test1"] for r in rows(path)] == ["0.25", "", "0.75"]
        assert [r["seconds"] for r in rows(path)] == ["", "1.5", "1.5"]


@pytest.mark.parametrize("warm_start", [0.0, 3.0, 8.5])
def test_the_warm_starts_seconds_are_charged_before_the_first_meta_iteration(tmp_path, warm_start):
    """A method on the pseudo data starts with the warm start's seconds spent: the row of iteration 0 holds
    them, and it reaches fewer iterations under the same budget."""
    schedule = Schedule(100, 5, 5, time_budget=20.0)
    free, *_ = run(tmp_path, "free", schedule, Uneven((1.0,)))
    charged, _, curve, _ = run(tmp_path, "charged", schedule, Uneven((1.0,)), charged=warm_start)
    assert rows(curve)[0]["seconds"] == f"{warm_start}"
    assert free.iteration == 20 and charged.iteration == 20 - int(warm_start + 0.5)  # 8.5 s: 11 iterations fit
    assert charged_seconds(curve) <= 20.0


def test_a_warm_start_longer_than_the_budget_leaves_no_meta_iteration(tmp_path):
    method, best, curve, _ = run(tmp_path, "late", Schedule(100, 5, 5, time_budget=10.0), charged=12.0)
    assert method.iteration == 0 and [r["iteration"] for r in rows(curve)] == ["0"]
    assert best.entries["test1"]["iteration"] == 0  # the initial meta-model, evaluated


@pytest.mark.parametrize("stop_after", [3, 6, 9])
def test_a_preempted_budgeted_run_resumes_with_its_accounting_and_ends_like_an_uninterrupted_one(tmp_path,
                                                                                                  stop_after):
    """SIGTERM mid-run: the resumed run's budget starts from its curve (the warm start's charge included), so it
    ends at the same iteration, with the same curve and models, as the run never stopped."""
    schedule = Schedule(100, 4, 4, time_budget=38.5)  # 12 iterations and the charge take 32 s; the 13th ends at 39
    reference, reference_best, reference_curve, _ = run(tmp_path, "reference", schedule, charged=2.0)
    with pytest.raises(StopRequested):
        run(tmp_path, "stopped", schedule, Uneven(stop_after=stop_after), charged=2.0)
    resumed, best, curve, _ = run(tmp_path, "stopped", schedule, charged=2.0, resumed=True)
    assert resumed.iteration == reference.iteration == 12
    assert rows(curve) == rows(reference_curve)
    assert torch.equal(best.entries["test1"]["model"]["weight"], reference_best.entries["test1"]["model"]["weight"])


def test_a_run_its_budget_ended_stays_ended_when_rerun(tmp_path):
    """The next iteration did not fit: a rerun (Snakemake after a deleted output) resumes and trains no further,
    even where that iteration would now fit in what the curve says is left."""
    schedule = Schedule(100, 5, 5, time_budget=9.5)
    first, *_ = run(tmp_path, "run", schedule, Uneven((7.0, 1.0, 2.0)))
    assert first.iteration == 2  # 7 + 1; the third (2 s) would end at 10
    again, _, curve, _ = run(tmp_path, "run", schedule, Uneven((7.0, 1.0, 0.5)), resumed=True)
    assert again.iteration == 2 and len(rows(curve)) == 3


def test_the_cost_table_and_the_accuracy_against_time_figure_charge_the_warm_start(tmp_path):
    curves = {}
    for method, warm_start in (("purer", "12.5"), ("taco", "")):
        path = tmp_path / "ss" / method / "seed0" / "shot1" / "curve.csv"
        path.parent.mkdir(parents=True)
        path.write_text(f"iteration,meta_loss,meta_accuracy,seconds,val_test1\n0,,,{warm_start},0.2\n"
                        "1,1.0,0.5,30.0,\n2,1.0,0.5,20.0,0.3\n")
        curves[method] = training_cost(path)
    assert curves["purer"]["seconds"] == 62.5 and curves["purer"]["warm_start_seconds"] == 12.5
    assert curves["taco"]["seconds"] == 50.0 and curves["taco"]["warm_start_seconds"] is None
    assert curves["purer"]["iterations"] == curves["taco"]["iterations"] == 2
    costs = [{**c, "scenario": "ss", "method": m, "shot": 1} for m, c in curves.items()]
    table = "\n".join(cost_markdown(costs))
    assert "| ss | purer | 1 | 2 | 12.5 | 62.5 |" in table and "| ss | taco | 1 | 2 | - | 50.0 |" in table
    assert "inversion excluded" not in table
    assert "warm-start inversion's, charged" in table
    results = [{"scenario": "ss", "method": m, "shot": 1, "calibration": "plain", "mean": 0.5, "ci95": 0.01,
                "episodes": 10} for m in curves]
    figure = plot_accuracy_vs_time(results, costs, tmp_path / "time.png")
    drawn = sorted(float(c.lines[0].get_xdata()[0]) for c in figure.axes[0].containers)
    assert drawn == [50.0, 62.5]
