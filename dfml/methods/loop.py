"""The meta-training loop every method shares: meta-val selection per protocol (when to evaluate; what is kept:
dfml/evaluation/selection.py), checkpoints and exact resume, NaN stops, SIGTERM, progress. Nothing in it knows
which method it drives (dfml/methods/base.py).

A checkpoint holds the method's state, the iteration, the best meta-val accuracy, iteration and model per
protocol, whether the time budget ended the run, and a fingerprint of what it is valid for (settings, inputs,
code: dfml/metatrain.py); a checkpoint with another fingerprint is ignored.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.evaluation.selection import BestModels
from dfml.methods.base import MetaTrainingMethod, StepLog, check_finite


@dataclass(frozen=True)
class Schedule:
    """``iterations`` meta-iterations, or fewer when ``time_budget`` runs out first: a study's equal wall-time
    budget, in seconds of meta-iterations (meta-val evaluations excluded) plus whatever the run was charged
    before its first one (``spent`` at the start: the warm start of a method on the pseudo data). A
    meta-iteration that would end past the budget is abandoned (:func:`train`): the iterations a run keeps never
    total more than the budget. The last iteration kept is always evaluated and checkpointed."""

    iterations: int
    eval_every: int
    checkpoint_every: int
    time_budget: float | None = None
    keep: frozenset[int] = frozenset()  # iterations whose meta-model is kept (metatrain.keep_checkpoints)

    def finished(self, iteration: int, spent: float) -> bool:
        return iteration >= self.iterations or (self.time_budget is not None and spent >= self.time_budget)

    def fits(self, spent: float) -> bool:
        """Whether ``spent`` seconds stay within the budget (always, without one)."""
        return self.time_budget is None or spent <= self.time_budget

    def evaluates(self, iteration: int, spent: float = 0.0) -> bool:
        return iteration % self.eval_every == 0 or self.finished(iteration, spent)

    def checkpoints(self, iteration: int, spent: float = 0.0) -> bool:
        return iteration % self.checkpoint_every == 0 or self.finished(iteration, spent)

    def keeps(self, iteration: int) -> bool:
        return iteration in self.keep


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived (preemption, scancel): a checkpoint was written before leaving."""


class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag the loop checks between iterations."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def save_state(path: Path, method: MetaTrainingMethod, best: BestModels, fingerprint: str,
               budget_spent: bool = False) -> None:
    save_checkpoint(path, {"fingerprint": fingerprint, "iteration": method.iteration,
                           "method": method.state_dict(), "best": best.state_dict(), "budget_spent": budget_spent})


@dataclass(frozen=True)
class Resumed:
    """What a resumed run continues from: the iteration, and whether the time budget had ended it (the next
    meta-iteration did not fit: a rerun must not try it again, its result would depend on the machine's load)."""

    iteration: int
    budget_spent: bool


def resume(path: Path, method: MetaTrainingMethod, best: BestModels, fingerprint: str,
           device: torch.device | str = "cpu", describe_difference: Callable[[str | None, str], str] | None = None,
           log: Callable[[str], None] = print) -> Resumed | None:
    """Restore ``method`` and ``best`` from the checkpoint at ``path`` when it was written for
    ``fingerprint``; None when not resumed."""
    path = Path(path)
    if not path.is_file():
        return None
    state = load_checkpoint(path, device)
    if state.get("fingerprint") != fingerprint:
        why = (describe_difference(state.get("fingerprint"), fingerprint) if describe_difference
               else "fingerprint differs")
        log(f"ignoring {path}: {why}; starting over")
        return None
    method.load_state_dict(state["method"])
    best.load_state_dict(state["best"])
    log(f"resuming from {path} at meta-iteration {method.iteration}")
    return Resumed(method.iteration, bool(state.get("budget_spent", False)))


def budget_used(resumed: Resumed | None, schedule: Schedule, curve_spent: float) -> float:
    """Seconds of the time budget a run has used when it starts: what its curve says (a fresh run: the warm
    start's charge), or all of it when it resumes a run the budget ended."""
    if resumed is not None and resumed.budget_spent and schedule.time_budget is not None:
        return max(curve_spent, schedule.time_budget)
    return curve_spent


def detached_copy(state):
    """A copy of a method's state_dict that its later steps cannot change (optimisers update their moments in
    place, and a state_dict may hand out the live tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: detached_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(detached_copy(value) for value in state)
    return state


def train(method: MetaTrainingMethod, schedule: Schedule, *, checkpoint_path: Path, fingerprint: str,
          evaluate: Callable[[], dict[str, float]], best: BestModels,
          on_log: Callable[[StepLog | None, dict[str, float] | None], None],
          on_best: Callable[[str], None] = lambda name: None, progress=None, spent: float = 0.0,
          on_late_evaluation: Callable[[int, dict[str, float]], None] = lambda iteration, val: None,
          on_keep: Callable[[int], None] = lambda iteration: None,
          log: Callable[[str], None] = print) -> dict[str, float]:
    """Run ``method`` until ``schedule`` is finished (``spent``: seconds of the budget already used: the
    warm start charged to a fresh run, or from the curve of a resumed run); evaluate on meta-val at 0 (a fresh
    run), every ``eval_every`` and at the end under every protocol (``evaluate`` returns {protocol: accuracy}),
    keep each protocol's best model in ``best`` (``on_best(protocol)`` after each improvement), call
    ``on_keep(iteration)`` at the iterations ``schedule.keep`` names (before that iteration's checkpoint),
    checkpoint every ``checkpoint_every``, at the end and on SIGTERM (then :class:`StopRequested`). A nan or inf meta loss
    stops the run (:class:`~dfml.methods.base.NonFiniteLoss`). Returns the best accuracy per protocol.

    Under a time budget, the method's state is copied before each meta-iteration; one that ends past the budget
    is abandoned (the method restored, as a resume would restore it) and the run ends with the iteration before
    it, evaluated then if it was not (``on_late_evaluation(iteration, val)``: its curve row gets the scores)
    and checkpointed as spent. So the run is the one that pinning its iterations replays, and no run keeps more
    than its budget; the abandoned iteration's wall time trains nothing."""

    def select(val: dict[str, float]) -> None:
        for name in best.offer(method.iteration, val, method.meta_model):
            on_best(name)

    def end_before(abandoned: StepLog, before: dict) -> None:
        method.load_state_dict(before)
        log(f"meta-iteration {abandoned.iteration} took {abandoned.seconds:.2f} s and would end past the time budget "
            f"({spent:.2f} of {schedule.time_budget:g} s used): abandoned, the run ends after meta-iteration "
            f"{method.iteration}")
        if method.iteration % schedule.eval_every != 0:  # not evaluated when it ran
            val = evaluate()
            select(val)
            on_late_evaluation(method.iteration, val)
        save_state(checkpoint_path, method, best, fingerprint, budget_spent=True)

    with GracefulStop() as stop:
        if method.iteration == 0:
            val = evaluate()
            select(val)
            on_log(None, val)
        while not schedule.finished(method.iteration, spent):
            before = detached_copy(method.state_dict()) if schedule.time_budget is not None else None
            step_log = method.step()
            if not schedule.fits(spent + step_log.seconds):  # before the nan check: a pinned replay never runs it
                end_before(step_log, before)
                break
            check_finite(step_log.meta_loss, step_log.iteration, "meta loss")
            spent += step_log.seconds
            val = None
            if schedule.evaluates(method.iteration, spent):
                val = evaluate()
                select(val)
            on_log(step_log, val)
            if progress is not None:
                progress.update(1)
            if schedule.keeps(method.iteration):
                on_keep(method.iteration)
            if schedule.checkpoints(method.iteration, spent):
                save_state(checkpoint_path, method, best, fingerprint)
            if stop.signal is not None:
                save_state(checkpoint_path, method, best, fingerprint)
                raise StopRequested(f"stopped by signal {stop.signal} after meta-iteration {method.iteration}; "
                                    f"checkpoint written to {checkpoint_path}, rerun to resume")
    return best.accuracies()
