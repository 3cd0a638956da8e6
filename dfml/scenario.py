"""What the inversion, meta-training and meta-testing phases of one scenario share: its pool as
inversion members, its stores, and pseudo-image pictures (its episode sets: dfml/evaluation/episodes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfml.data import DatasetStore
from dfml.inversion import PseudoDataset
from dfml.pool import PoolMember, load_pool


def load_scenario_pool(pool_dir: str | Path, device: torch.device | str = "cpu") -> list[PoolMember]:
    return load_pool(pool_dir, device)


def inversion_members(pool: list[PoolMember]) -> list[tuple[torch.nn.Module, list[str]]]:
    """(teacher, dataset-qualified class names in head order): unique across a multi-dataset pool."""
    return [(member.model, member.qualified_classes) for member in pool]


def scenario_stores(scenario: dict, data_root: str | Path = "data") -> dict[str, DatasetStore]:
    return {name: DatasetStore(Path(data_root) / name) for name in scenario["datasets"]}


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
