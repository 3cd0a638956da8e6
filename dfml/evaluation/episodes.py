"""Fixed real episodes: an episode set of one dataset split (its specs drawn from a seed), a scenario's sets
(one per dataset), and the per-episode average over datasets that every comparison pairs on.

Every method is scored on exactly the same episodes (specs drawn from a seed stream, dfml/seeds.py), so
differences between methods are paired.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from dfml.data import DatasetStore
from dfml.data.episodes import EpisodeSampler, EpisodeSpec, fixed_episodes
from dfml.seeds import derive_seed


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


def episode_sets(stores: dict[str, DatasetStore], scenario: dict, split: str, *, way: int, shot: int, query: int,
                 n_episodes: int, seed: int) -> list[EpisodeSet]:
    """One fixed episode set per dataset of the scenario, at the scenario's input format (dataset ``d``'s
    episodes from ``derive_seed(seed, d)``)."""
    return [build_episode_set(store, split, way=way, shot=shot, query=query, n_episodes=n_episodes,
                              seed=derive_seed(seed, index), image_size=scenario["image_size"],
                              channels=scenario["channels"])
            for index, store in enumerate(stores.values())]


def episode_means(per_dataset: Sequence[Sequence[float]]) -> list[float]:
    """Per-episode accuracy averaged over datasets (MH): the unit every comparison pairs on."""
    return [sum(values) / len(values) for values in zip(*per_dataset)]
