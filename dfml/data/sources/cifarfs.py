"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 with a fixed 64 / 16 / 20 class split, 600 images per class.

Accepted layouts under ``root`` (checked in this order):

1. ``cifar100_by_class.npz``: ``images`` uint8 [100, 600, 3, 32, 32] (class, instance, RGB, H, W) and
   ``classes``, the 100 fine label names in CIFAR-100's order (the copy in ``../shared/data/cifar100``);
2. torchvision's CIFAR-100 "python version" (``<root>/cifar-100-python/{train,test,meta}``); train and
   test images of a class are merged (500 + 100, train first, in file order);
3. nothing: with ``download=True`` torchvision fetches layout 2 into ``root``.

CIFAR-FS uses all 600 images of a class, so both layouts give the same split. A class's group in the
store is its CIFAR-100 superclass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfml.data.store import DatasetNotFoundError, StoreFormatError, StoreInfo, write_store

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# CIFAR-100's 20 superclasses ("coarse labels") of 5 classes each.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_SUPERCLASS_OF = {name: superclass for superclass, names in CIFAR100_SUPERCLASSES.items() for name in names}

# The Bertinetto et al. split (as distributed with R2-D2 and used by PURER's CIFAR-FS folders).
META_TRAIN = (
    "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can",
    "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin",
    "elephant", "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard",
    "lobster", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree",
    "plate", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk",
    "skyscraper", "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout",
    "tulip", "turtle", "willow_tree", "wolf",
)
META_VAL = (
    "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
    "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
)
META_TEST = (
    "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
    "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
)
CIFARFS_SPLITS = {"meta_train": META_TRAIN, "meta_val": META_VAL, "meta_test": META_TEST}

CIFARFS_MEAN = (0.5071, 0.4867, 0.4408)
CIFARFS_STD = (0.2675, 0.2565, 0.2761)
NPZ_FILE = "cifar100_by_class.npz"
NPZ_SHAPE = (100, 600, 3, 32, 32)
PYTHON_FOLDER = "cifar-100-python"
PYTHON_FILES = ("train", "test", "meta")


def how_to_obtain(root: Path) -> str:
    return (
        f"CIFAR-100 was expected under {root}, as {NPZ_FILE} (images uint8 {list(NPZ_SHAPE)} and classes, "
        f"see ../shared/data/cifar100/README.md) or as torchvision's python version "
        f"{root / PYTHON_FOLDER}/{{train,test,meta}}. Run with download=True on a machine with internet access (torchvision downloads "
        f"cifar-100-python.tar.gz into {root}), or unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
        f"there yourself and point `root` at the folder that contains {PYTHON_FOLDER}/."
    )


def torchvision_root(root: str | Path) -> Path:
    """Accept the folder containing ``cifar-100-python/`` or the npz, that folder itself, or the npz file."""
    root = Path(root)
    return root.parent if root.name in (PYTHON_FOLDER, NPZ_FILE) else root


def load_npz(path: Path) -> dict[str, torch.Tensor]:
    """Class name -> uint8 [600, 3, 32, 32] from ``cifar100_by_class.npz``, its layout checked."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("images", "classes") if key not in data.files]
            if missing:
                raise StoreFormatError(f"{path}: lacks array(s) {missing}; expected 'images' and 'classes'")
            images, classes = data["images"], [str(name) for name in data["classes"]]
    except (OSError, ValueError) as err:
        raise StoreFormatError(f"{path}: not a readable npz file ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 5 or images.shape[0] != len(classes) or images.shape[2:] != NPZ_SHAPE[2:]:
        raise StoreFormatError(f"{path}: 'images' is {images.dtype} {list(images.shape)}, expected uint8 "
                               f"[classes, instances, 3, 32, 32] with one row per name in 'classes'")
    if classes != list(CIFAR100_CLASSES):
        unexpected = sorted(set(classes) ^ set(CIFAR100_CLASSES))[:5]
        raise StoreFormatError(f"{path}: 'classes' differ from CIFAR-100's fine labels in their order, e.g. {unexpected}")
    return {name: torch.from_numpy(np.ascontiguousarray(images[index])) for index, name in enumerate(classes)}


def has_python_files(root: Path) -> bool:
    return all((root / PYTHON_FOLDER / name).is_file() for name in PYTHON_FILES)


def load_cifar100(root: Path, download: bool):
    """(train, test) torchvision CIFAR100 datasets; downloads only when the files are missing."""
    from torchvision.datasets import CIFAR100

    if not has_python_files(root):
        if not download:
            raise DatasetNotFoundError(how_to_obtain(root))
        try:
            CIFAR100(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise DatasetNotFoundError(f"downloading CIFAR-100 failed ({err}). " + how_to_obtain(root)) from None
    try:
        return CIFAR100(str(root), train=True), CIFAR100(str(root), train=False)
    except RuntimeError as err:
        raise DatasetNotFoundError(
            f"CIFAR-100 files under {root / PYTHON_FOLDER} are incomplete or corrupted ({err}); "
            f"delete them and download again. " + how_to_obtain(root)
        ) from None


def images_by_class(datasets) -> dict[str, torch.Tensor]:
    """Class name -> uint8 [n, 3, 32, 32], the datasets' images concatenated in order."""
    classes = datasets[0].classes
    per_class: dict[str, list[np.ndarray]] = {name: [] for name in classes}
    for dataset in datasets:
        targets = np.asarray(dataset.targets)
        for index, name in enumerate(classes):
            per_class[name].append(dataset.data[targets == index])
    return {name: torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous() for name, arrays in per_class.items()}


def prepare(
    out_dir: str | Path,
    *,
    dataset_name: str = "cifarfs",
    root: str | Path = "data/raw/cifar100",
    download: bool = True,
) -> StoreInfo:
    """Build the CIFAR-FS store (64 / 16 / 20 classes, 600 images of 32x32x3 each)."""
    root = torchvision_root(root)
    if (root / NPZ_FILE).is_file():
        images = load_npz(root / NPZ_FILE)
    else:
        train, test = load_cifar100(root, download)
        if list(train.classes) != list(CIFAR100_CLASSES):
            unexpected = sorted(set(train.classes) ^ set(CIFAR100_CLASSES))[:5]
            raise StoreFormatError(f"{root / PYTHON_FOLDER}: class names differ from CIFAR-100's, e.g. {unexpected}")
        images = images_by_class((train, test))
    splits = {split: list(names) for split, names in CIFARFS_SPLITS.items()}
    return write_store(
        out_dir, dataset_name, images, splits, source="cifarfs", mean=list(CIFARFS_MEAN), std=list(CIFARFS_STD),
        groups=CIFAR100_SUPERCLASS_OF,
    )
