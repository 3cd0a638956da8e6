"""Picture of a canonical store: one row per class, a few of its images per row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dfml.data.store import DatasetStore


def sample_class_images(store: DatasetStore, classes: Sequence[str], per_class: int, seed: int = 0) -> np.ndarray:
    """uint8 [len(classes), per_class, H, W, C]; a seeded draw without replacement per class."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in classes:
        images = store.images(name)
        if len(images) < per_class:
            raise ValueError(f"class {name!r} has {len(images)} images, fewer than per_class={per_class}")
        chosen = np.sort(rng.choice(len(images), size=per_class, replace=False))
        rows.append(images[chosen].permute(0, 2, 3, 1).numpy())
    return np.stack(rows)


def save_class_grid(
    store: DatasetStore, classes: Sequence[str], per_class: int, path: str | Path, seed: int = 0, cell_inches: float = 0.6
) -> Path:
    """Write a PNG grid (rows = classes labelled by name, columns = instances) and return its path."""
    if not classes:
        raise ValueError("save_class_grid needs at least one class")
    return save_array_grid(sample_class_images(store, classes, per_class, seed), classes, path, cell_inches)


def save_array_grid(grid: np.ndarray, row_labels: Sequence[str], path: str | Path, cell_inches: float = 0.6) -> Path:
    """PNG of uint8 images [rows, cols, H, W, C] with one label per row."""
    n_rows, n_cols = grid.shape[:2]
    label_inches = 0.07 * max(len(name) for name in row_labels) + 0.15
    figure = Figure(figsize=(label_inches + n_cols * cell_inches, n_rows * cell_inches), dpi=100)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for row, name in enumerate(row_labels):
        for col in range(n_cols):
            ax = axes[row, col]
            image = grid[row, col]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    figure.subplots_adjust(left=label_inches / (label_inches + n_cols * cell_inches), right=0.99, top=0.99,
                           bottom=0.01, wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, facecolor="white", metadata={"Software": None})
    return path
