"""Dataset sources: each turns raw data (generated, npz, archive, folder, download) into a canonical store.

Every source module has ``prepare(out_dir, *, dataset_name, <options>) -> StoreInfo``; the registry below
maps a source name to that module. Modules are imported on first use so that, for example, building
the embedded glyph dataset never imports torchvision.

    prepare_dataset("glyphs", "data/glyphs", image_size=32, seed=0)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dfml.data.store import StoreInfo

SOURCES: dict[str, str] = {
    "glyphs": "dfml.data.sources.glyphs",
    "omniglot": "dfml.data.sources.omniglot",
    "cifarfs": "dfml.data.sources.cifarfs",
    "miniimagenet": "dfml.data.sources.miniimagenet",
    "imagefolder": "dfml.data.sources.imagefolder",
}


def get_source(source: str) -> Callable[..., StoreInfo]:
    """The ``prepare`` function of a registered source."""
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}: expected one of {', '.join(sorted(SOURCES))}")
    return importlib.import_module(SOURCES[source]).prepare


def source_options(source: str) -> list[str]:
    """The option names a source accepts (besides the output folder)."""
    params = inspect.signature(get_source(source)).parameters
    return [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def prepare_dataset(source: str, out_dir: str | Path, **options) -> StoreInfo:
    """Build the canonical store ``out_dir`` from ``source``.

    ``dataset_name`` defaults to the name of ``out_dir`` (``data/glyphs`` -> ``glyphs``); the other
    options are the source's own (see ``source_options``).
    """
    prepare = get_source(source)
    allowed = source_options(source)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for dataset source {source!r}: allowed are {allowed}")
    options.setdefault("dataset_name", Path(out_dir).resolve().name)
    return prepare(Path(out_dir), **options)


def split_by_fractions(
    classes: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded class-level split; every split gets at least one class, each list is sorted."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    ordered = sorted(classes)
    n_test = max(1, round(len(ordered) * test_fraction))
    n_val = max(1, round(len(ordered) * val_fraction))
    if len(ordered) - n_test - n_val < 1:
        raise ValueError(f"{len(ordered)} classes are too few for three non-empty splits")
    order = np.random.default_rng([seed, 0x5B117]).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    return {
        "meta_test": sorted(shuffled[:n_test]),
        "meta_val": sorted(shuffled[n_test : n_test + n_val]),
        "meta_train": sorted(shuffled[n_test + n_val :]),
    }


__all__ = ["SOURCES", "get_source", "prepare_dataset", "source_options", "split_by_fractions"]
