"""What the inversion, meta-training and meta-testing phases of one scenario share: its pool as
inversion members, its stores, its meta-val/meta-test episode sets, and pseudo-image pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfml.data import DatasetStore
from dfml.evaluate import EpisodeSet, build_episode_set
from dfml.inversion import PseudoDataset
from dfml.pool import PoolMember, derive_seed, load_pool


def load_scenario_pool(pool_dir: str | Path, device: torch.device | str = "cpu") -> list[PoolMember]:
    return load_pool(pool_dir, device)


def inversion_members(pool: list[PoolMember]) -> list[tuple[torch.nn.Module, list[str]]]:
    """(teacher, dataset-qualified class names in head order): unique across a multi-dataset pool."""
    return [(member.model, member.qualified_classes) for member in pool]


def scenario_stores(scenario: dict, data_root: str | Path = "data") -> dict[str, DatasetStore]:
    return {name: DatasetStore(Path(data_root) / name) for name in scenario["datasets"]}


def episode_sets(stores: dict[str, DatasetStore], scenario: dict, split: str, *, way: int, shot: int, query: int,
                 n_episodes: int, seed: int) -> list[EpisodeSet]:
    """One fixed episode set per dataset of the scenario, at the scenario's input format."""
    return [build_episode_set(store, split, way=way, shot=shot, query=query, n_episodes=n_episodes,
                              seed=derive_seed(seed, index), image_size=scenario["image_size"],
                              channels=scenario["channels"])
            for index, store in enumerate(stores.values())]


def pseudo_to_pictures(pseudo: PseudoDataset, stores: dict[str, DatasetStore], classes: list[str],
                       per_class: int) -> np.ndarray:
    """uint8 [len(classes), per_class, H, W, C] of pseudo images, shown in their dataset's pixel space."""
    rows = []
    for name in classes:
        dataset = name.split("/", 1)[0]
        images = pseudo.class_images(name)[:per_class].detach().cpu().float()
        pixels = stores[dataset].denormalize(images) if dataset in stores else _min_max(images)
        rows.append((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.stack(rows)


def _min_max(images: torch.Tensor) -> torch.Tensor:
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)
