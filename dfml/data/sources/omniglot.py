"""Omniglot (Lake et al. 2015): 1623 handwritten characters x 20 drawers.

Accepted layouts under ``root`` (checked in this order):

1. the npz pair ``images_background.npz`` / ``images_evaluation.npz`` with arrays ``images``
   (bool [characters, drawers, 105, 105], True = background) and ``labels`` ([characters, drawers]);
2. the official archives unpacked: ``images_background/<alphabet>/<character>/*.png`` and
   ``images_evaluation/...``;
3. nothing: with ``download=True`` the official zips are fetched into ``root`` and unpacked (layout 2).

Background characters are meta-train and meta-val (meta-val = the last ``val_fraction`` of them in id
order, so alphabets stay together as far as possible); evaluation characters are meta-test.

Each character's group in the store is its alphabet: the folder name in the archive layout; for the npz
pair, which stores no names, the official alphabet order and sizes below applied to the character ids.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dfml.data.store import DatasetNotFoundError, StoreFormatError, StoreInfo, write_store

PARTS = ("images_background", "images_evaluation")
ARCHIVE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{part}.zip"
RESIZE_CHUNK = 2048

# The official alphabets (archive folder names) with their character counts, in character-id order: the
# 4-digit ids of the PNG file names, which the npz pair keeps as labels. The ids run alphabet by alphabet
# in the alphabetical order of earlier names, so some folders sort elsewhere: Syriac_(Estrangelo) as
# "Estrangelo", Anglo-Saxon_Futhorc as "Futhorc", Japanese_(hiragana) as "Hiragana", Malay_(Jawi_-_Arabic)
# as "Jawi", Japanese_(katakana) as "Katakana", Alphabet_of_the_Magi as "Magi", Burmese_(Myanmar) as
# "Myanmar", Syriac_(Serto) as "Serto". Checked against file names of the official archives (Arcadian/
# character01/0001, Braille/character12/0203, Cyrillic/character11/0228, Greek/character01/0394,
# Japanese_(katakana)/character21/0616, Alphabet_of_the_Magi/character01/0709, Sanskrit/character11/0861,
# Tifinagh/character54/0963, Angelic/character09/0973, Kannada/character25/1229, Malayalam/character05/1276,
# Tibetan/character14/1569, ULOG/character14/1611) and by eye at every boundary of the npz pair (Latin
# 683-708 are a..z, Old Church Slavonic 1389-1433 starts with а б в г д е).
BACKGROUND_ALPHABETS: tuple[tuple[str, int], ...] = (
    ("Arcadian", 26),
    ("Armenian", 41),
    ("Asomtavruli_(Georgian)", 40),
    ("Balinese", 24),
    ("Bengali", 46),
    ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 14),
    ("Braille", 26),
    ("Cyrillic", 33),
    ("Early_Aramaic", 22),
    ("Syriac_(Estrangelo)", 23),
    ("Anglo-Saxon_Futhorc", 29),
    ("Futurama", 26),
    ("Grantha", 43),
    ("Greek", 24),
    ("Gujarati", 48),
    ("Hebrew", 22),
    ("Japanese_(hiragana)", 52),
    ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 16),
    ("Malay_(Jawi_-_Arabic)", 40),
    ("Japanese_(katakana)", 47),
    ("Korean", 40),
    ("Latin", 26),
    ("Alphabet_of_the_Magi", 20),
    ("Mkhedruli_(Georgian)", 41),
    ("Burmese_(Myanmar)", 34),
    ("N_Ko", 33),
    ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 14),
    ("Sanskrit", 42),
    ("Tagalog", 17),
    ("Tifinagh", 55),
)
EVALUATION_ALPHABETS: tuple[tuple[str, int], ...] = (
    ("Angelic", 20),
    ("Atemayar_Qelisayer", 26),
    ("Atlantean", 26),
    ("Aurek-Besh", 26),
    ("Avesta", 26),
    ("Ge_ez", 26),
    ("Glagolitic", 45),
    ("Gurmukhi", 45),
    ("Kannada", 41),
    ("Keble", 26),
    ("Malayalam", 47),
    ("Manipuri", 40),
    ("Mongolian", 30),
    ("Old_Church_Slavonic_(Cyrillic)", 45),
    ("Oriya", 46),
    ("Syriac_(Serto)", 23),
    ("Sylheti", 28),
    ("Tengwar", 25),
    ("Tibetan", 42),
    ("ULOG", 26),
)
PART_ALPHABETS = dict(zip(PARTS, (BACKGROUND_ALPHABETS, EVALUATION_ALPHABETS)))


def how_to_obtain(root: Path) -> str:
    return (
        f"Omniglot was expected under {root}: either images_background.npz + images_evaluation.npz "
        f"(arrays `images` bool [characters, 20, 105, 105] True = background, `labels`), or the official "
        f"archives unpacked as {root}/images_background/<alphabet>/<character>/*.png and "
        f"{root}/images_evaluation/... . Get the archives from https://github.com/brendenlake/omniglot "
        f"(python/images_background.zip, python/images_evaluation.zip) and unzip them into {root}, "
        f"or run with download=True on a machine with internet access."
    )


def ascii_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()-]+", "_", name)


def load_npz_part(path: Path) -> np.ndarray:
    """Ink masks bool [characters, drawers, H, W] in label order (True = ink)."""
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    if images.ndim != 4 or labels.shape != images.shape[:2]:
        raise ValueError(f"{path}: expected images [characters, drawers, H, W] and labels [characters, drawers], "
                         f"got {images.shape} and {labels.shape}")
    if not (labels == labels[:, :1]).all():
        raise ValueError(f"{path}: labels vary along the drawer axis; expected one character per row")
    order = np.argsort(labels[:, 0], kind="stable")
    return ~images[order].astype(bool)


def load_npz_pair(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Characters are numbered 1..n over background then evaluation, whatever the files' label base."""
    background = load_npz_part(root / f"{PARTS[0]}.npz")
    evaluation = load_npz_part(root / f"{PARTS[1]}.npz")
    width = max(4, len(str(len(background) + len(evaluation))))
    named_background = {f"char_{i + 1:0{width}d}": ink for i, ink in enumerate(background)}
    offset = len(background)
    named_evaluation = {f"char_{offset + i + 1:0{width}d}": ink for i, ink in enumerate(evaluation)}
    return named_background, named_evaluation


def load_archive_part(part_dir: Path) -> dict[str, np.ndarray]:
    """``<alphabet>/<character>/*.png`` -> {"alphabet/character": bool ink [drawers, H, W]}, sorted."""
    characters = sorted(p for p in part_dir.glob("*/*") if p.is_dir())
    if not characters:
        raise DatasetNotFoundError(f"no <alphabet>/<character> folders in {part_dir}. " + how_to_obtain(part_dir.parent))
    classes = {}
    for character in tqdm(characters, desc=f"reading {part_dir.name}", unit="character"):
        files = sorted(character.glob("*.png"))
        if not files:
            raise DatasetNotFoundError(f"no PNG images in {character}")
        name = f"{ascii_safe(character.parent.name)}/{ascii_safe(character.name)}"
        classes[name] = np.stack([np.asarray(Image.open(f).convert("L")) < 128 for f in files])
    return classes


def download_archives(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        url = ARCHIVE_URL.format(part=part)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            archive = Path(tmp) / f"{part}.zip"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as err:
                raise DatasetNotFoundError(f"downloading {url} failed ({err}). " + how_to_obtain(root)) from None
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(root)


def load_omniglot(root: Path, download: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if all((root / f"{part}.npz").is_file() for part in PARTS):
        return load_npz_pair(root)
    if not all((root / part).is_dir() for part in PARTS):
        if not download:
            raise DatasetNotFoundError(how_to_obtain(root))
        download_archives(root)
    return load_archive_part(root / PARTS[0]), load_archive_part(root / PARTS[1])


def alphabets_by_id(characters: list[str], part: str) -> dict[str, str]:
    """Character -> alphabet for the characters of one npz part, listed in id order."""
    alphabets = PART_ALPHABETS[part]
    expected = sum(size for _, size in alphabets)
    if len(characters) != expected:
        raise StoreFormatError(
            f"{part}.npz holds {len(characters)} characters, but Omniglot's {len(alphabets)} "
            f"{part.removeprefix('images_')} alphabets have {expected}: cannot tell which alphabet each character "
            f"belongs to. Use the complete npz pair or the official archives (<alphabet>/<character>/ folders)"
        )
    return dict(zip(characters, (name for name, size in alphabets for _ in range(size))))


def character_alphabets(background: list[str], evaluation: list[str]) -> dict[str, str]:
    """Character -> alphabet: the folder of archive names (``Alphabet/characterNN``), else by npz id."""
    if all("/" in name for name in background + evaluation):
        return {name: name.split("/", 1)[0] for name in background + evaluation}
    return {**alphabets_by_id(background, PARTS[0]), **alphabets_by_id(evaluation, PARTS[1])}


def resize_ink(ink: np.ndarray, image_size: int) -> torch.Tensor:
    """bool ink [N, H, W] -> uint8 [N, 1, size, size] with area averaging (antialiased), ink = 255."""
    chunks = []
    for start in range(0, len(ink), RESIZE_CHUNK):
        batch = torch.from_numpy(ink[start : start + RESIZE_CHUNK]).to(torch.float32)[:, None]
        small = F.adaptive_avg_pool2d(batch, image_size)
        chunks.append((small * 255.0).round().to(torch.uint8))
    return torch.cat(chunks)


def resize_classes(classes: dict[str, np.ndarray], image_size: int) -> dict[str, torch.Tensor]:
    """Resize class by class in groups of about RESIZE_CHUNK images (bounded memory)."""
    resized: dict[str, torch.Tensor] = {}
    group: list[str] = []
    names = list(classes)
    for index, name in enumerate(names):
        group.append(name)
        if sum(len(classes[g]) for g in group) >= RESIZE_CHUNK or index == len(names) - 1:
            small = resize_ink(np.concatenate([classes[g] for g in group]), image_size)
            resized.update(zip(group, torch.split(small, [len(classes[g]) for g in group])))
            group = []
    return resized


def background_split(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ordered = sorted(names)
    n_val = max(1, round(len(ordered) * val_fraction))
    return ordered[:-n_val], ordered[-n_val:]


def prepare(
    out_dir: str | Path,
    *,
    dataset_name: str = "omniglot",
    root: str | Path = "data/raw/omniglot",
    image_size: int = 28,
    val_fraction: float = 0.2,
    download: bool = True,
) -> StoreInfo:
    """Build the Omniglot store (1623 classes; 964 background -> meta-train/val, 659 -> meta-test)."""
    root = Path(root)
    background, evaluation = load_omniglot(root, download)
    groups = character_alphabets(list(background), list(evaluation))
    train, val = background_split(list(background), val_fraction)
    images = resize_classes({**background, **evaluation}, image_size)
    splits = {"meta_train": train, "meta_val": val, "meta_test": sorted(evaluation)}
    return write_store(out_dir, dataset_name, images, splits, source="omniglot", groups=groups)
