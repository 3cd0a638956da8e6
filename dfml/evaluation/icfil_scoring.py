"""ICFIL's episode scorer: the ICFIL accuracy of an episode under one setting or a grid of them.

:class:`ICFILScorer` runs the four stages of :mod:`dfml.evaluation.icfil` on one episode (the reference path,
also on :func:`dfml.evaluation.batched.score_episodes`'s worker threads) or those of
:mod:`dfml.evaluation.icfil_stacked` on a chunk of stacked episodes (the GPU path). Used by meta-test's
``icfil`` calibration and by ICFIL's tuning on meta-val (:mod:`dfml.evaluation.tuning`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dfml.data.episodes import Episode
from dfml.evaluation.icfil import (ICFILSettings, InvertedEpisode, adapt_and_invert, calibrate, icfil_query_logits,
                                   inversion_key)
from dfml.evaluation.icfil_stacked import can_stack, stacked_grid_predictions
from dfml.meta import Learner, Task
from dfml.meta.params import ParamDict
from dfml.meta.tasks import TaskBatch


def icfil_scorer(learner: Learner, model: nn.Module, params: ParamDict, settings: ICFILSettings = ICFILSettings(),
                 seed: int = 0, *, steps: int | None = None) -> "ICFILScorer":
    """Like :func:`dfml.evaluation.scoring.learner_scorer`, with ICFIL between adaptation and prediction.

    Deterministic per episode: the inversion's random numbers come from ``seed`` and a hash of the
    episode's support set, so an episode scores the same whatever the order or number of calls.
    """
    return ICFILScorer(learner, model, params, [settings], seed, steps=steps, single=True)


def icfil_grid_scorer(learner: Learner, model: nn.Module, params: ParamDict, grid: list[ICFILSettings],
                      seed: int = 0, *, steps: int | None = None) -> "ICFILScorer":
    """Episode -> the ICFIL accuracy under each of ``grid``, equal to :func:`icfil_scorer` per setting;
    stages 1-2 run once per distinct :func:`inversion_key` (a calibration sweep inverts once)."""
    return ICFILScorer(learner, model, params, grid, seed, steps=steps)


class ICFILScorer:
    """ICFIL accuracies of an episode under a grid of settings (one accuracy when ``single``).

    ``for_worker`` gives a copy with a private model (the BatchNorm hooks live on the model), for
    :func:`dfml.evaluation.batched.score_episodes`'s worker threads.
    """

    def __init__(self, learner: Learner, model: nn.Module, params: ParamDict, grid: list[ICFILSettings],
                 seed: int = 0, *, steps: int | None = None, single: bool = False):
        if single and len(grid) != 1:
            raise ValueError(f"a single-setting ICFIL scorer needs one setting, got {len(grid)}")
        self.learner, self.model, self.params, self.grid = learner, model, params, list(grid)
        self.seed, self.steps, self.single = seed, steps, single

    def __call__(self, episode: Episode) -> float | list[float]:
        accuracies = [float((p == episode.query_y).float().mean()) for p in self.grid_predictions(episode)]
        return accuracies[0] if self.single else accuracies

    def grid_predictions(self, episode: Episode) -> list[Tensor]:
        """[n_query] predicted labels under each setting of the grid."""
        task = Task.from_episode(episode)
        inverted: dict[tuple, InvertedEpisode] = {}
        predictions = []
        for settings in self.grid:
            key = inversion_key(settings)
            if key not in inverted:
                inverted[key] = adapt_and_invert(self.learner, self.model, self.params, task.support_x,
                                                 task.support_y, settings, self.seed, steps=self.steps,
                                                 diagnostics=False)
            result = calibrate(self.learner, self.model, inverted[key], task.support_x, task.support_y, settings,
                               diagnostics=False)
            logits = icfil_query_logits(self.learner, self.model, result.params, task.support_x, task.support_y,
                                        task.query_x)
            predictions.append(logits.argmax(dim=-1))
        return predictions

    @property
    def can_stack(self) -> bool:
        return can_stack(self.grid)

    def stacked(self, batch: TaskBatch) -> list:
        """One result per stacked episode (a :class:`~dfml.meta.TaskBatch`), vmapped
        (:mod:`dfml.evaluation.icfil_stacked`)."""
        correct = [(p == batch.query_y).float().mean(dim=1) for p in self.stacked_predictions(batch)]
        per_episode = torch.stack(correct, dim=1).tolist()  # [E][setting]
        return [row[0] for row in per_episode] if self.single else per_episode

    def stacked_predictions(self, batch: TaskBatch) -> list[Tensor]:
        """Per setting: [E, n_query] predicted labels of the stacked episodes."""
        return stacked_grid_predictions(self.learner, self.model, self.params, self.grid, batch, self.seed, self.steps)

    def for_worker(self) -> "ICFILScorer":
        return ICFILScorer(self.learner, copy.deepcopy(self.model), self.params, self.grid, self.seed,
                           steps=self.steps, single=self.single)
