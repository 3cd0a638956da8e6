"""Meta-test protocol: fixed seeded episodes, per-episode accuracies, mean and 95% CI.

Every method is scored on exactly the same episodes (specs drawn from a seed), so differences
between methods are paired.

Statistics use one distribution throughout: Student's t with n - 1 degrees of freedom and the sample
standard deviation (ddof = 1). The 95% CI half-width is ``t_{0.975, n-1} * s / sqrt(n)`` and the paired
p-value is the two-sided t-test on the same t, so a paired CI excludes 0 exactly when p < 0.05.
Several comparisons are corrected together with :func:`holm_adjust` (Holm's step-down).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from dfml.data import DatasetStore
from dfml.data.episodes import Episode, EpisodeSampler, EpisodeSpec, fixed_episodes
from dfml.evaluation.batched import Batched, CudaGraphed, score_episodes
from dfml.meta import Learner, Task
from dfml.meta.batched import batch_norm_from_primitives
from dfml.meta.learners import functorch_inner_gradients
from dfml.meta.tasks import TaskBatch


@dataclass(frozen=True)
class EpisodeSet:
    """Fixed episodes of one dataset split, materialised on demand."""

    dataset: str
    sampler: EpisodeSampler
    specs: tuple[EpisodeSpec, ...]

    def __len__(self) -> int:
        return len(self.specs)

    def fingerprint(self) -> str:
        """sha256 of the episode specs: equal fingerprints mean exactly the same episodes."""
        payload = json.dumps([self.dataset, [s.to_json() for s in self.specs]], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def episodes(self, device: torch.device | str | None = None):
        for spec in self.specs:
            yield self.sampler.materialize(spec, device)


def build_episode_set(store: DatasetStore, split: str, *, way: int, shot: int, query: int, n_episodes: int,
                      seed: int, image_size: int | None = None, channels: int | None = None) -> EpisodeSet:
    sampler = EpisodeSampler(store, split=split, way=way, shot=shot, query=query, image_size=image_size,
                             channels=channels)
    return EpisodeSet(store.name, sampler, tuple(fixed_episodes(sampler, n_episodes, seed)))


ALPHA = 0.05  # two-sided: 95% intervals, significance at p < 0.05


def _t_quantile(df: int, alpha: float = ALPHA) -> float:
    from scipy import stats  # imported lazily: scipy is slow to import and only needed here

    return float(stats.t.ppf(1 - alpha / 2, df))


def _two_sided_p(t: float, df: int) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def _t_summary(values: torch.Tensor, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, CI half-width, two-sided p-value of mean = 0), all from Student's t with n - 1 dof.

    n = 1: the spread is unknown, so the interval is unbounded (half-width ``inf``) and p = 1.
    Zero sample variance (n >= 2): the half-width is 0; p = 0 when the mean is non-zero (the limit of
    the t-test as s -> 0), p = 1 when it is zero. Both keep "CI excludes 0" <=> "p < alpha".
    """
    n = values.numel()
    if n == 0:
        raise ValueError("no accuracies to summarise")
    mean = float(values.mean())
    if n == 1:
        return mean, math.inf, 1.0
    se = float(values.std(unbiased=True)) / math.sqrt(n)
    if se == 0.0:
        return mean, 0.0, (1.0 if mean == 0.0 else 0.0)
    half = _t_quantile(n - 1, alpha) * se
    p = _two_sided_p(mean / se, n - 1)
    # One decision, two views of it: |mean| > half and p < alpha can only disagree by rounding when
    # |t| equals the quantile to the last bit; the p-value is nudged to the CI's side in that case.
    if (abs(mean) > half) != (p < alpha):
        p = math.nextafter(alpha, 0.0) if abs(mean) > half else alpha
    return mean, half, p


def mean_ci95(accuracies: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width ``t_{0.975, n-1} * s / sqrt(n)`` (s: sample std, ddof = 1).

    One value (n = 1) has an unbounded interval (half-width ``inf``); equal values have half-width 0.
    """
    mean, half, _ = _t_summary(torch.as_tensor(accuracies, dtype=torch.float64).flatten())
    return mean, half


class PlainScorer:
    """Plain test-time adaptation: ``steps`` inner steps on the support, accuracy on the queries.

    ``scorer(episode)`` is the per-episode reference; :func:`dfml.evaluation.batched.score_episodes` runs it
    on worker threads (``for_worker``) or vmapped over stacked episodes (``stacked``).
    """

    def __init__(self, learner: Learner, model: torch.nn.Module, params: dict[str, torch.Tensor],
                 steps: int | None = None):
        self.learner, self.model, self.params, self.steps = learner, model, params, steps
        self._graphed: dict[int, CudaGraphed] = {}

    def __call__(self, episode: Episode) -> float:
        task = Task(episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        with torch.enable_grad():  # MAML's inner loop needs gradients even at test time
            _, accuracy = self.learner.task_loss(self.model, self.params, task, steps=self.steps, training=False)
        return float(accuracy)

    def predictions(self, episode: Episode) -> torch.Tensor:
        """[n_query] predicted labels, computed as :meth:`__call__` computes them."""
        task = Task.from_episode(episode)
        return self._logits(task.support_x, task.support_y, task.query_x, task.n_way).argmax(dim=-1)

    def for_worker(self) -> "PlainScorer":
        return PlainScorer(self.learner, copy.deepcopy(self.model), self.params, self.steps)

    def stacked(self, batch: TaskBatch) -> list[float]:
        """One accuracy per stacked episode, vmapped (see :meth:`stacked_predictions`)."""
        correct = self.stacked_predictions(batch) == batch.query_y
        dtype = next(iter(self.params.values())).dtype  # the per-episode path's accuracy has the logits' dtype
        return correct.to(dtype).mean(dim=1).tolist()

    def stacked_predictions(self, batch: TaskBatch) -> torch.Tensor:
        """[E, n_query] predicted labels of E stacked episodes in one vmapped pass (the training engine's
        vmap path: inner gradients by ``torch.func.grad``, BatchNorm from primitives); on CUDA captured
        once per chunk shape in a CUDA graph (:class:`dfml.evaluation.batched.CudaGraphed`)."""
        if batch.n_way not in self._graphed:
            self._graphed[batch.n_way] = CudaGraphed(partial(self._stacked_labels, batch.n_way))
        return self._graphed[batch.n_way](batch.support_x, batch.support_y, batch.query_x)

    def _stacked_labels(self, n_way: int, support_x: torch.Tensor, support_y: torch.Tensor,
                        query_x: torch.Tensor) -> torch.Tensor:
        def logits(episode_support_x, episode_support_y, episode_query_x):
            return self._logits(episode_support_x, episode_support_y, episode_query_x, n_way)

        with functorch_inner_gradients(), batch_norm_from_primitives(self.model):
            out = torch.func.vmap(logits, randomness="different")(support_x, support_y, query_x)
        return out.argmax(dim=-1)

    def _logits(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                n_way: int) -> torch.Tensor:
        # The computation of Learner.loss_on_tensors(training=False) under __call__'s enable_grad.
        steps = self.learner.test_steps if self.steps is None else self.steps
        with torch.enable_grad(), torch.no_grad():
            adapted = self.learner.adapt(self.model, self.params, support_x, support_y, steps=steps,
                                         create_graph=False, n_way=n_way)
            return self.learner.query_logits(self.model, self.params, adapted, query_x)


def learner_scorer(learner: Learner, model: torch.nn.Module, params: dict[str, torch.Tensor],
                   steps: int | None = None) -> PlainScorer:
    """Plain test-time adaptation: ``steps`` inner steps on the support, accuracy on the queries."""
    return PlainScorer(learner, model, params, steps)


def episode_means(per_dataset: Sequence[Sequence[float]]) -> list[float]:
    """Per-episode accuracy averaged over datasets (MH): the unit every comparison pairs on."""
    return [sum(values) / len(values) for values in zip(*per_dataset)]


def episode_accuracies(scorer, episode_set: EpisodeSet, device: torch.device | str = "cpu", progress: bool = False,
                       desc: str = "episodes", batched: Batched = "auto") -> list[float]:
    """Every episode's score, along the path ``batched`` selects (:mod:`dfml.evaluation.batched`)."""
    return score_episodes(scorer, episode_set, device, batched=batched, progress=progress, desc=desc)


@dataclass(frozen=True)
class PairedDifference:
    """A - B on the same episodes: mean, 95% CI half-width and two-sided paired t-test p-value.

    CI and p-value come from the same t distribution (n - 1 dof, sample std of the differences), so
    :attr:`excludes_zero` (``|mean| > ci95``) holds exactly when ``p_value < 0.05``.
    """

    mean: float
    ci95: float
    p_value: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return abs(self.mean) > self.ci95


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Paired A - B (see :func:`_t_summary` for n = 1 and zero variance)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same episodes: {len(a)} vs {len(b)} accuracies")
    diff = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    mean, ci, p = _t_summary(diff)
    return PairedDifference(mean, ci, p, diff.numel())


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of the i-th is
    ``min(1, max_{j <= i} (m - j + 1) * p_(j))``. Rejecting where the adjusted p < alpha is Holm's
    procedure: it controls the family-wise error rate at alpha over the m comparisons.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted
