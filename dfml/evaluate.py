"""Meta-test protocol: fixed seeded episodes, per-episode accuracies, mean and 95% CI.

Every method is scored on exactly the same episodes (specs drawn from a seed), so differences
between methods are paired.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from dfml.data import DatasetStore
from dfml.data.episodes import Episode, EpisodeSampler, EpisodeSpec, fixed_episodes
from dfml.meta import Learner, Task


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


def mean_ci95(accuracies: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and 1.96 * std / sqrt(n) (population std, as the field reports it)."""
    values = torch.as_tensor(accuracies, dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("no accuracies to summarise")
    std = values.std(unbiased=False) if values.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return float(values.mean()), float(1.96 * std / math.sqrt(values.numel()))


EpisodeScorer = Callable[[Episode], float]


def learner_scorer(learner: Learner, model: torch.nn.Module, params: dict[str, torch.Tensor],
                   steps: int | None = None) -> EpisodeScorer:
    """Plain test-time adaptation: ``steps`` inner steps on the support, accuracy on the queries."""

    def score(episode: Episode) -> float:
        task = Task(episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        with torch.enable_grad():  # MAML's inner loop needs gradients even at test time
            _, accuracy = learner.task_loss(model, params, task, steps=steps, training=False)
        return float(accuracy)

    return score


def episode_accuracies(scorer: EpisodeScorer, episode_set: EpisodeSet, device: torch.device | str = "cpu",
                       progress: bool = False, desc: str = "episodes") -> list[float]:
    return [scorer(episode) for episode in tqdm(episode_set.episodes(device), total=len(episode_set),
                                                 desc=desc, disable=not progress, mininterval=2.0)]


@dataclass(frozen=True)
class PairedDifference:
    """A - B on the same episodes: mean, 95% CI half-width and two-sided paired t-test p-value."""

    mean: float
    ci95: float
    p_value: float
    n: int


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same episodes: {len(a)} vs {len(b)} accuracies")
    diff = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    mean, ci = mean_ci95(diff)
    n = diff.numel()
    sd = float(diff.std(unbiased=True)) if n > 1 else 0.0
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        from scipy import stats

        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), df=n - 1))
    return PairedDifference(mean, ci, p, n)
