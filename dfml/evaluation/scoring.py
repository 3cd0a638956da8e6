"""Plain scoring: test-time adaptation on an episode's support, accuracy on its queries.

:class:`PlainScorer` is the episode scorer of plain adaptation (meta-val selection, the ``plain`` and
``steps`` calibrations of meta-test, the steps control's tuning); :func:`episode_accuracies` scores a fixed
episode set with any scorer along the batched paths of :mod:`dfml.evaluation.batched`. ICFIL's scorer is
:mod:`dfml.evaluation.icfil_scoring` (kept apart, so that what only adapts plainly never runs ICFIL's code).
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from dfml.data.episodes import Episode
from dfml.evaluation.batched import Batched, CudaGraphed, score_episodes
from dfml.evaluation.episodes import EpisodeSet
from dfml.meta import Learner, Task
from dfml.meta.batched import batch_norm_from_primitives
from dfml.meta.learners import functorch_inner_gradients
from dfml.meta.tasks import TaskBatch


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


def episode_accuracies(scorer, episode_set: EpisodeSet, device: torch.device | str = "cpu", progress: bool = False,
                       desc: str = "episodes", batched: Batched = "auto") -> list[float]:
    """Every episode's score, along the path ``batched`` selects (:mod:`dfml.evaluation.batched`)."""
    return score_episodes(scorer, episode_set, device, batched=batched, progress=progress, desc=desc)
