"""N-way K-shot Q-query episodes from a canonical store.

An episode is first drawn as an :class:`EpisodeSpec` (class names and image indices only), then
materialised into tensors. Specs are cheap, JSON-serialisable and reproducible: the fixed
evaluation sets that every method is scored on are lists of specs drawn from a seed, where
episode ``i`` depends only on ``(seed, i)``, never on how many episodes are drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dfml.data.store import DatasetStore, atomic_write_text


@dataclass(frozen=True)
class EpisodeSpec:
    """Which images form an episode. Label of class ``classes[k]`` is ``k``."""

    classes: tuple[str, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict:
        return {"classes": list(self.classes), "support": [list(s) for s in self.support],
                "query": [list(q) for q in self.query]}

    @classmethod
    def from_json(cls, data: dict) -> "EpisodeSpec":
        return cls(tuple(data["classes"]), tuple(tuple(s) for s in data["support"]),
                   tuple(tuple(q) for q in data["query"]))


@dataclass
class Episode:
    """A materialised episode: normalised float images, labels 0..way-1 in class order."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: tuple[str, ...] = ()

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                       self.query_y.to(device), self.classes)


class EpisodeSampler:
    """Draws episodes from a split, or from an explicit class subset (e.g. a pool member's classes)."""

    def __init__(self, store: DatasetStore, *, split: str | None = None, classes: list[str] | None = None,
                 way: int = 5, shot: int = 1, query: int = 15, image_size: int | None = None,
                 channels: int | None = None):
        if (split is None) == (classes is None):
            raise ValueError("give exactly one of split= or classes=")
        if way < 2 or shot < 1 or query < 1:
            raise ValueError(f"need way >= 2, shot >= 1, query >= 1; got way={way}, shot={shot}, query={query}")
        self.store = store
        self.classes = store.classes(split) if split is not None else sorted(classes)
        self.way, self.shot, self.query = way, shot, query
        self.image_size, self.channels = image_size, channels
        self._check_feasible(split or "the given classes")
        self._sizes = {name: int(img.shape[0]) for name, img in zip(self.classes, store.load_classes(self.classes))}

    def _check_feasible(self, where: str) -> None:
        if len(self.classes) < self.way:
            raise ValueError(f"{self.way}-way episodes need at least {self.way} classes, "
                             f"{where} of {self.store.name} has {len(self.classes)}")
        need = self.shot + self.query
        for name, images in zip(self.classes, self.store.load_classes(self.classes)):
            if images.shape[0] < need:
                raise ValueError(f"class {name!r} of {self.store.name} has {images.shape[0]} images, "
                                 f"a {self.shot}-shot {self.query}-query episode needs {need}")

    def sample_spec(self, rng: np.random.Generator) -> EpisodeSpec:
        picked = rng.choice(len(self.classes), size=self.way, replace=False)
        names = tuple(self.classes[i] for i in picked)
        support, query = [], []
        for name in names:
            order = rng.permutation(self._sizes[name])[: self.shot + self.query]
            support.append(tuple(int(i) for i in order[: self.shot]))
            query.append(tuple(int(i) for i in order[self.shot:]))
        return EpisodeSpec(names, tuple(support), tuple(query))

    def materialize(self, spec: EpisodeSpec, device: torch.device | str | None = None) -> Episode:
        images = self.store.load_classes(list(spec.classes))
        support_x = torch.cat([img[list(idx)] for img, idx in zip(images, spec.support)])
        query_x = torch.cat([img[list(idx)] for img, idx in zip(images, spec.query)])
        support_y = torch.repeat_interleave(torch.arange(len(spec.classes)), torch.tensor([len(s) for s in spec.support]))
        query_y = torch.repeat_interleave(torch.arange(len(spec.classes)), torch.tensor([len(q) for q in spec.query]))
        prepare = lambda x: self.store.model_input(x, self.image_size, self.channels)  # noqa: E731
        episode = Episode(prepare(support_x), support_y, prepare(query_x), query_y, spec.classes)
        return episode.to(device) if device is not None else episode

    def sample(self, rng: np.random.Generator, device: torch.device | str | None = None) -> Episode:
        return self.materialize(self.sample_spec(rng), device)


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream for episode ``index`` of a fixed set."""
    return np.random.default_rng([int(seed), int(index)])


def fixed_episodes(sampler: EpisodeSampler, n_episodes: int, seed: int) -> list[EpisodeSpec]:
    """The same ``n_episodes`` specs for the same (store, split, way, shot, query, seed), every call."""
    return [sampler.sample_spec(episode_rng(seed, i)) for i in range(n_episodes)]


def save_episodes(path: str | Path, specs: list[EpisodeSpec], **meta) -> None:
    atomic_write_text(Path(path), json.dumps({**meta, "episodes": [s.to_json() for s in specs]}) + "\n")


def load_episodes(path: str | Path) -> list[EpisodeSpec]:
    with open(path) as handle:
        return [EpisodeSpec.from_json(item) for item in json.load(handle)["episodes"]]
