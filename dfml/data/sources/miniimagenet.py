"""mini-ImageNet (Vinyals et al.; Ravi & Larochelle split, 64 / 16 / 20 classes) from a local folder.

Accepted layouts under ``root``:

a. split folders of class folders: ``train/ val/ test/`` (or ``meta_train/ meta_val/ meta_test/``),
   each holding ``<wnid>/<image files>``;
b. the Ravi & Larochelle CSVs ``train.csv val.csv test.csv`` (columns ``filename,label``) next to an
   ``images/`` folder with the files they name.

The split always comes from the folders or CSVs; images are resized to ``image_size`` (84) with three
channels and ImageNet normalisation.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dfml.data.sources.imagefolder import class_folders, default_workers, load_class_images
from dfml.data.store import SPLITS, DatasetNotFoundError, StoreInfo, write_store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_LAYOUTS = (("train", "val", "test"), ("meta_train", "meta_val", "meta_test"))
CSV_NAMES = ("train.csv", "val.csv", "test.csv")


def how_to_obtain(root: Path) -> str:
    return (
        f"mini-ImageNet was expected under {root} in one of these layouts: "
        f"(a) {root}/train/<wnid>/<images>, {root}/val/..., {root}/test/... "
        f"(or meta_train/ meta_val/ meta_test/); "
        f"(b) {root}/train.csv, val.csv, test.csv (columns filename,label) with the images in {root}/images/. "
        f"The data is not redistributable here: build it from ImageNet with the Ravi & Larochelle split CSVs "
        f"(github.com/twitter/meta-learning-lstm) or use a copy you are licensed to."
    )


def read_split_csv(path: Path, images_dir: Path) -> dict[str, list[Path]]:
    """wnid -> sorted image paths, wnids sorted."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns filename,label, got {reader.fieldnames}")
        by_label: dict[str, list[Path]] = {}
        for row in reader:
            by_label.setdefault(row["label"], []).append(images_dir / row["filename"])
    missing = [p for paths in by_label.values() for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{path} names {len(missing)} missing image files, e.g. {missing[0]}")
    return {label: sorted(by_label[label]) for label in sorted(by_label)}


def find_split_classes(root: Path) -> dict[str, dict[str, list[Path]]]:
    """Store split name -> (class -> image files) from whichever layout ``root`` has."""
    for layout in FOLDER_LAYOUTS:
        if all((root / name).is_dir() for name in layout):
            return {split: class_folders(root / name) for split, name in zip(SPLITS, layout)}
    if all((root / name).is_file() for name in CSV_NAMES) and (root / "images").is_dir():
        return {split: read_split_csv(root / name, root / "images") for split, name in zip(SPLITS, CSV_NAMES)}
    raise DatasetNotFoundError(how_to_obtain(root))


def prepare(
    out_dir: str | Path,
    *,
    dataset_name: str = "miniimagenet",
    root: str | Path = "data/raw/miniimagenet",
    image_size: int = 84,
    workers: int | None = None,
) -> StoreInfo:
    """Build the mini-ImageNet store; the class split is the one given by the folders or CSVs."""
    root = Path(root)
    split_classes = find_split_classes(root)
    images = {}
    for split, classes in split_classes.items():
        images.update(load_class_images(classes, image_size, 3, workers or default_workers(), desc=f"loading {split}"))
    splits = {split: sorted(classes) for split, classes in split_classes.items()}
    counts = {split: len(names) for split, names in splits.items()}
    return write_store(
        out_dir, dataset_name, images, splits, source="miniimagenet",
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), extra={"classes_per_split": counts},
    )
