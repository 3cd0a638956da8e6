"""Custom data: a folder of class folders (``root/<class>/<image files>``), split by class with a seed.

Also holds the image-file helpers other folder-based sources (mini-ImageNet) reuse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dfml.data.sources import split_by_fractions
from dfml.data.store import DatasetNotFoundError, StoreInfo, write_store

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; hidden files are skipped."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def class_folders(root: Path) -> dict[str, list[Path]]:
    """Sorted class name -> sorted image files, for every non-hidden sub-folder of ``root``."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = image_files(folder)
        if not files:
            raise DatasetNotFoundError(f"class folder {folder} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        classes[folder.name] = files
    return classes


def detect_channels(files: Sequence[Path]) -> int:
    """1 when every image is grayscale, else 3 (reads only the headers)."""
    for path in files:
        with Image.open(path) as image:
            if image.mode not in GRAYSCALE_MODES:
                return 3
    return 1


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 [channels, size, size]: converted, then resized (antialiased bilinear) to a square."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_class_images(
    classes: dict[str, list[Path]], image_size: int, channels: int, workers: int, desc: str = "loading images"
) -> dict[str, torch.Tensor]:
    """Class name -> uint8 [n, C, size, size]; decoding runs in a thread pool, results keep file order."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files = [path for paths in classes.values() for path in paths]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(tqdm(pool.map(lambda p: load_image(p, image_size, channels), files), total=len(files), desc=desc, unit="img"))
    stacked = torch.from_numpy(np.stack(arrays))
    counts = [len(paths) for paths in classes.values()]
    return dict(zip(classes, torch.split(stacked, counts)))


def prepare(
    out_dir: str | Path,
    *,
    root: str | Path,
    dataset_name: str = "imagefolder",
    image_size: int = 84,
    channels: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    workers: int | None = None,
) -> StoreInfo:
    """Store from ``root/<class>/<images>``; channels default to 1 if every image is grayscale, else 3."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist: expected {root}/<class name>/<image files> "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}), one sub-folder per class"
        )
    classes = class_folders(root)
    if len(classes) < 3:
        raise DatasetNotFoundError(f"{root} has {len(classes)} class folders; need at least 3 (one per split)")
    if channels is None:
        channels = detect_channels([path for paths in classes.values() for path in paths])
    images = load_class_images(classes, image_size, channels, workers or default_workers())
    splits = split_by_fractions(list(classes), val_fraction, test_fraction, seed)
    return write_store(out_dir, dataset_name, images, splits, source="imagefolder")
