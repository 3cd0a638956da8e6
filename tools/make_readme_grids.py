"""Draw the README's dataset pictures: docs/images/glyphs_grid.png and docs/images/omniglot_grid.png.

Builds both stores in a temporary folder with the options of params.yaml (glyphs from matplotlib's
fonts, Omniglot from the shared npz pair) and draws ``--classes`` classes, evenly spaced over the sorted
class list, ``--per-class`` images each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from dfml.config import load_params
from dfml.data.grid import save_class_grid
from dfml.data.sources import prepare_dataset
from dfml.data.store import DatasetStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    default_shared = Path(os.environ.get("DFML_SHARED", REPO_ROOT.parent / "shared"))
    parser.add_argument("--omniglot-root", type=Path, default=default_shared / "data" / "omniglot")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def evenly_spaced(names: list[str], count: int) -> list[str]:
    step = max(1, len(names) // count)
    return names[::step][:count]


def draw(store: DatasetStore, args: argparse.Namespace, filename: str) -> None:
    every_class = sorted(name for split in ("meta_train", "meta_val", "meta_test") for name in store.classes(split))
    path = save_class_grid(store, evenly_spaced(every_class, args.classes), args.per_class, args.out_dir / filename, args.seed)
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> int:
    datasets = load_params(REPO_ROOT / "params.yaml")["datasets"]
    with tempfile.TemporaryDirectory() as tmp:
        prepare_dataset("glyphs", Path(tmp) / "glyphs", **datasets["glyphs"]["options"])
        draw(DatasetStore(Path(tmp) / "glyphs"), args, "glyphs_grid.png")
        omniglot = {**datasets["omniglot"]["options"], "root": args.omniglot_root}
        prepare_dataset("omniglot", Path(tmp) / "omniglot", **omniglot, download=False)
        draw(DatasetStore(Path(tmp) / "omniglot"), args, "omniglot_grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
