"""Meta-val selection: which meta-model each evaluation protocol keeps from one training run.

During meta-training the shared loop (dfml/methods/loop.py) asks, every ``eval_every`` meta-iterations, for the
meta-val accuracy of the current meta-model under every protocol (:func:`meta_val_evaluator`: plain adaptation
with the protocol's test steps, averaged over the scenario's datasets), scored on fixed meta-val episodes
(:func:`selection_sets`, stream :data:`dfml.seeds.META_VAL_EPISODES`), and keeps each protocol's best model
(:class:`BestModels`). ``scripts/metatest.py --split meta_val`` scores the same episodes on purpose.
"""

from __future__ import annotations

import math

import torch

from dfml.data import DatasetStore
from dfml.evaluation.episodes import EpisodeSet, episode_sets
from dfml.evaluation.scoring import episode_accuracies, learner_scorer
from dfml.evaluation.stats import mean_ci95
from dfml.seeds import META_VAL_EPISODES, stream_seed


def selection_sets(stores: dict[str, DatasetStore], settings: dict, *, way: int, shot: int, query: int,
                   n_episodes: int) -> list[EpisodeSet]:
    """The meta-val episodes of the selection, one set per dataset of ``settings["scenario"]``."""
    return episode_sets(stores, settings["scenario"], "meta_val", way=way, shot=shot, query=query,
                        n_episodes=n_episodes, seed=stream_seed(settings, META_VAL_EPISODES))


def meta_val_evaluator(protocols, learner, method, val_sets: list[EpisodeSet], device):
    """{protocol: mean meta-val accuracy over the datasets' episode sets} of ``method``'s meta-model at the time
    of each call (``method``: anything with ``meta_model`` and ``params``, a dfml.methods.base method)."""

    def evaluate() -> dict[str, float]:
        scores = {}
        for protocol in protocols:
            scorer = learner_scorer(learner, method.meta_model, method.params, steps=protocol.test_steps)
            scores[protocol.name] = sum(mean_ci95(episode_accuracies(scorer, es, device))[0]
                                        for es in val_sets) / len(val_sets)
        return scores

    return evaluate


class BestModels:
    """Per evaluation protocol: the best meta-val accuracy so far, its iteration and a CPU copy of the
    meta-model then (a later evaluation replaces it only when strictly better)."""

    def __init__(self, protocols: list[str]):
        self.entries = {name: {"iteration": 0, "accuracy": None, "model": None} for name in protocols}

    def offer(self, iteration: int, scores: dict[str, float], model: torch.nn.Module) -> list[str]:
        """Keep every protocol's model that improved; returns their names."""
        improved = []
        for name, accuracy in scores.items():
            current = self.entries[name]["accuracy"]
            if accuracy > (-math.inf if current is None else current):
                self.entries[name] = {"iteration": iteration, "accuracy": accuracy,
                                      "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                improved.append(name)
        return improved

    def accuracies(self) -> dict[str, float]:
        return {name: e["accuracy"] for name, e in self.entries.items() if e["accuracy"] is not None}

    def state_dict(self) -> dict:
        return {name: {"iteration": e["iteration"], "accuracy": e["accuracy"], "model": e["model"]}
                for name, e in self.entries.items() if e["accuracy"] is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, saved in state.items():
            self.entries[name] = {"iteration": saved["iteration"], "accuracy": saved["accuracy"],
                                  "model": {k: v.cpu() for k, v in saved["model"].items()}}
