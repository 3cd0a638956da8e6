"""The canonical dataset store every downstream phase reads.

Layout of ``data/<dataset>/``:

- ``images.safetensors``: one uint8 tensor ``[n_images, channels, size, size]`` per class,
  keyed by the class name.
- ``splits.json``: dataset name, image size, channels, normalisation (mean/std per channel),
  the source it was built from, the sorted class names of ``meta_train``, ``meta_val`` and
  ``meta_test``, and ``groups``: the group of every class (a glyph's script, an Omniglot character's
  alphabet, a CIFAR-100 superclass; the class itself when the source knows none), which
  :mod:`dfml.leakage` maps to script families to keep concepts from crossing datasets.

Sources (``dfml.data.sources``) only ever produce this store; samplers, pretraining and
evaluation only ever read it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

SPLITS = ("meta_train", "meta_val", "meta_test")
IMAGES_FILE = "images.safetensors"
SPLITS_FILE = "splits.json"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (source or canonical store) is not where it was expected."""


class StoreFormatError(ValueError):
    """A canonical store is malformed (missing classes, wrong dtype, overlapping splits...)."""


def check_split_name(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are shared (cluster, DVC cache)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` with its JSON header's keys sorted.

    safetensors writes the header's metadata from a hash map, so the same tensors and metadata come
    out in different bytes on every call, and DVC would hash two identical artifacts apart. The data
    buffer and its offsets are untouched; the header keeps safetensors' 8-byte alignment.
    """
    raw = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(canonical_safetensors(tensors, metadata))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StoreInfo:
    dataset: str
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, list[str]]
    source: str = ""
    extra: dict = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # class -> group; empty in stores written before groups

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "image_size": self.image_size,
            "channels": self.channels,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "source": self.source,
            "splits": {name: list(self.splits[name]) for name in SPLITS},
            "num_classes": {name: len(self.splits[name]) for name in SPLITS},
            "groups": dict(sorted(self.groups.items())),
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> "StoreInfo":
        try:
            return cls(
                dataset=data["dataset"],
                image_size=int(data["image_size"]),
                channels=int(data["channels"]),
                mean=tuple(float(v) for v in data["normalization"]["mean"]),
                std=tuple(float(v) for v in data["normalization"]["std"]),
                splits={name: list(data["splits"][name]) for name in SPLITS},
                source=data.get("source", ""),
                extra=data.get("extra", {}),
                groups=dict(data.get("groups", {})),
            )
        except KeyError as err:
            raise StoreFormatError(f"{where}: missing key {err}") from None


def validate_splits(splits: dict[str, list[str]], classes: set[str] | None = None) -> None:
    """Splits must be sorted, disjoint and (when given) exactly cover ``classes``."""
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        raise StoreFormatError(f"splits lack {missing}; expected {list(SPLITS)}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        names = splits[name]
        if not names:
            raise StoreFormatError(f"split {name} is empty")
        if list(names) != sorted(names):
            raise StoreFormatError(f"split {name} is not sorted")
        for cls in names:
            if cls in seen:
                raise StoreFormatError(f"class {cls!r} is in both {seen[cls]} and {name}")
            seen[cls] = name
    if classes is not None and set(seen) != classes:
        extra = sorted(set(seen) - classes)[:5]
        unused = sorted(classes - set(seen))[:5]
        raise StoreFormatError(f"splits and images disagree: in splits only {extra}, in images only {unused}")


def validate_groups(groups: dict[str, str], classes: set[str]) -> None:
    """Every class has exactly one non-empty group name."""
    missing = sorted(classes - set(groups))[:5]
    unknown = sorted(set(groups) - classes)[:5]
    if missing or unknown:
        raise StoreFormatError(f"class groups and images disagree: without a group {missing}, "
                               f"unknown classes {unknown}")
    empty = sorted(name for name, group in groups.items() if not isinstance(group, str) or not group)[:5]
    if empty:
        raise StoreFormatError(f"classes {empty} have an empty group name")


def channel_stats(class_images: dict[str, torch.Tensor], classes: list[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) over the images of ``classes``."""
    total = None
    total_sq = None
    count = 0
    for name in classes:
        x = class_images[name].to(torch.float64) / 255.0
        s = x.sum(dim=(0, 2, 3))
        sq = (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def write_store(
    root: str | Path,
    dataset: str,
    class_images: dict[str, torch.Tensor],
    splits: dict[str, list[str]],
    source: str,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    extra: dict | None = None,
    groups: dict[str, str] | None = None,
) -> StoreInfo:
    """Validate and write a canonical store atomically. mean/std default to meta-train statistics;
    ``groups`` (class -> group) defaults to every class being its own group."""
    root = Path(root)
    shapes = {tuple(t.shape[1:]) for t in class_images.values()}
    if len(shapes) != 1:
        raise StoreFormatError(f"{dataset}: classes have different image shapes {sorted(shapes)[:3]}")
    channels, height, width = next(iter(shapes))
    if height != width:
        raise StoreFormatError(f"{dataset}: images must be square, got {height}x{width}")
    for name, tensor in class_images.items():
        if tensor.dtype != torch.uint8:
            raise StoreFormatError(f"{dataset}: class {name!r} has dtype {tensor.dtype}, expected uint8")
        if tensor.shape[0] == 0:
            raise StoreFormatError(f"{dataset}: class {name!r} has no images")
    splits = {name: sorted(splits[name]) for name in SPLITS}
    validate_splits(splits, set(class_images))
    groups = {name: name for name in class_images} if groups is None else dict(groups)
    validate_groups(groups, set(class_images))
    if mean is None or std is None:
        mean, std = channel_stats(class_images, splits["meta_train"])
    info = StoreInfo(dataset, int(height), int(channels), tuple(mean), tuple(std), splits, source, extra or {},
                     groups)
    atomic_save_tensors(class_images, root / IMAGES_FILE, metadata={"dataset": dataset})
    atomic_write_text(root / SPLITS_FILE, json.dumps(info.to_json(), indent=2) + "\n")
    return info


class DatasetStore:
    """Read access to a canonical store: class lists per split and uint8 images per class."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        splits_path = self.root / SPLITS_FILE
        images_path = self.root / IMAGES_FILE
        if not splits_path.is_file() or not images_path.is_file():
            raise DatasetNotFoundError(
                f"no canonical dataset store at {self.root} (expected {SPLITS_FILE} and {IMAGES_FILE}); "
                f"build it with `dfml prepare <dataset> --out {self.root}` or `snakemake --cores 2 prepare_data`"
            )
        with open(splits_path) as handle:
            self.info = StoreInfo.from_json(json.load(handle), str(splits_path))
        self._images_path = images_path
        self._cache: dict[str, torch.Tensor] = {}
        with safe_open(images_path, framework="pt") as handle:
            self._keys = set(handle.keys())
        validate_splits(self.info.splits, self._keys)
        if self.info.groups:
            validate_groups(self.info.groups, self._keys)

    @property
    def name(self) -> str:
        return self.info.dataset

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def channels(self) -> int:
        return self.info.channels

    def classes(self, split: str) -> list[str]:
        return list(self.info.splits[check_split_name(split)])

    def groups(self) -> dict[str, str]:
        """Class -> group (script, alphabet, superclass...), as written by the dataset's source."""
        if not self.info.groups:
            raise StoreFormatError(
                f"{self.root / SPLITS_FILE} has no class groups (written before stores recorded them); rebuild "
                f"it with `python scripts/prepare_data.py --dataset {self.name} --out {self.root}` or "
                f"`snakemake --cores 2 prepare_data`"
            )
        return dict(self.info.groups)

    def images(self, class_name: str) -> torch.Tensor:
        """uint8 tensor [n, C, H, W] of one class (loaded once, then cached)."""
        if class_name not in self._keys:
            raise KeyError(f"class {class_name!r} is not in the store {self.root}")
        if class_name not in self._cache:
            with safe_open(self._images_path, framework="pt") as handle:
                self._cache[class_name] = handle.get_tensor(class_name)
        return self._cache[class_name]

    def load_classes(self, class_names: list[str]) -> list[torch.Tensor]:
        with safe_open(self._images_path, framework="pt") as handle:
            for name in class_names:
                if name not in self._keys:
                    raise KeyError(f"class {name!r} is not in the store {self.root}")
                if name not in self._cache:
                    self._cache[name] = handle.get_tensor(name)
        return [self._cache[name] for name in class_names]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32 normalised with the store's mean/std."""
        mean = torch.tensor(self.info.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        return (images.to(torch.float32) / 255.0 - mean) / std

    def model_input(self, images: torch.Tensor, image_size: int | None = None, channels: int | None = None) -> torch.Tensor:
        """uint8 images -> normalised floats at the requested size and channel count.

        Scenarios mixing datasets (MH) feed every dataset to the models at one size and channel count.
        """
        x = self.normalize(images)
        if channels is not None and channels != x.shape[-3]:
            if x.shape[-3] == 1:
                x = x.expand(*x.shape[:-3], channels, *x.shape[-2:])
            elif channels == 1:
                x = x.mean(dim=-3, keepdim=True)
            else:
                raise ValueError(f"cannot convert {x.shape[-3]}-channel images of {self.name} to {channels} channels")
        if image_size is not None and image_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        return x.contiguous()

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float images -> [0, 1] floats (for pictures of pseudo data)."""
        mean = torch.tensor(self.info.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images * std + mean).clamp(0, 1)


def open_store(root: str | Path) -> DatasetStore:
    return DatasetStore(root)
