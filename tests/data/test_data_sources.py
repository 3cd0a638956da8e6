"""Dataset sources -> canonical stores: glyphs, Omniglot, image folders, mini-ImageNet, CIFAR-FS, grids."""

import csv
import hashlib
import pickle

import numpy as np
import pytest
import torch
from conftest import shared_cifar100_root, shared_omniglot_root
from PIL import Image

from dfml.data import SPLITS, DatasetNotFoundError, DatasetStore, StoreFormatError
from dfml.data.grid import save_class_grid
from dfml.data.sources import SOURCES, prepare_dataset, source_options, split_by_fractions
from dfml.data.sources import cifarfs, glyphs



def store_digest(root) -> str:
    store = DatasetStore(root)
    digest = hashlib.sha256()
    for split in SPLITS:
        for name in store.classes(split):
            digest.update(f"{split}/{name}".encode())
            digest.update(store.images(name).numpy().tobytes())
    return digest.hexdigest()


def all_classes(store: DatasetStore) -> list[str]:
    return [name for split in SPLITS for name in store.classes(split)]


def assert_disjoint_splits(store: DatasetStore) -> None:
    names = all_classes(store)
    assert len(names) == len(set(names))
    for split in SPLITS:
        assert store.classes(split) == sorted(store.classes(split))


def write_png_classes(root, classes, per_class, size=(12, 10), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"img_{i:02d}.png")


# --- registry -------------------------------------------------------------------------------------


def test_unknown_source_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset source 'mnist'.*cifarfs, glyphs, imagefolder"):
        prepare_dataset("mnist", tmp_path / "x")


def test_unknown_option_is_named(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*'imagesize'.*image_size"):
        prepare_dataset("glyphs", tmp_path / "x", imagesize=32)


def test_every_source_accepts_a_dataset_name():
    for source in SOURCES:
        assert "dataset_name" in source_options(source)


def test_split_by_fractions_is_seeded_sorted_and_disjoint():
    names = [f"c{i:03d}" for i in range(100)]
    first = split_by_fractions(names, 0.15, 0.25, seed=1)
    assert first == split_by_fractions(list(reversed(names)), 0.15, 0.25, seed=1)
    assert first != split_by_fractions(names, 0.15, 0.25, seed=2)
    assert [len(first[s]) for s in SPLITS] == [60, 15, 25]
    assert sorted(sum(first.values(), [])) == names
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_fractions(names, 0.0, 0.25, seed=1)


# --- glyphs ---------------------------------------------------------------------------------------


def test_default_glyph_config_has_150_classes_of_16_fonts():
    plan = glyphs.glyph_plan()
    assert len(plan) >= 150
    assert all(len(fonts) >= 16 for fonts in plan.values())
    assert all((glyphs.font_dir() / font).is_file() for font in glyphs.FONT_FILES)
    names = list(glyphs.GLYPH_CLASSES)
    assert names == sorted(names) and all(name.isascii() for name in names)
    assert len(set(glyphs.GLYPH_CLASSES.values())) == len(names), "two classes share a character"
    assert len({name.lower() for name in names}) == len(names)


def test_default_glyph_split_is_about_60_15_25_and_stable():
    names = list(glyphs.glyph_plan())
    splits = split_by_fractions(names, 0.15, 0.25, seed=0)
    assert splits == split_by_fractions(names, 0.15, 0.25, seed=0)
    assert abs(len(splits["meta_test"]) / len(names) - 0.25) < 0.01
    assert abs(len(splits["meta_val"]) / len(names) - 0.15) < 0.01


GLYPH_SUBSET = ["digit_4", "greek_Xi", "cyrillic_Zhe", "latin_A", "latin_g_lower", "symbol_at", "latin_R", "ipa_esh"]


def test_glyph_generation_is_bitwise_deterministic(tmp_path):
    options = dict(classes=GLYPH_SUBSET, instances_per_font=2, image_size=16, seed=3)
    first = prepare_dataset("glyphs", tmp_path / "a", **options)
    second = prepare_dataset("glyphs", tmp_path / "b", **options)
    assert store_digest(tmp_path / "a") == store_digest(tmp_path / "b")
    assert first.splits == second.splits
    store = DatasetStore(tmp_path / "a")
    assert_disjoint_splits(store)
    assert sorted(all_classes(store)) == sorted(GLYPH_SUBSET)
    images = store.images("latin_A")
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.uint8
    assert images.max() == 255 and images.float().mean() < 100, "expected white ink on black"
    assert images[:, :, 0, :].float().mean() < 20, "the border should be background"
    other_seed = prepare_dataset("glyphs", tmp_path / "c", **{**options, "seed": 4})
    assert store_digest(tmp_path / "c") != store_digest(tmp_path / "a")
    assert other_seed.extra["fonts"] == sorted(glyphs.FONT_FILES)


def test_a_glyph_class_does_not_depend_on_the_other_classes():
    plan = glyphs.glyph_plan(GLYPH_SUBSET)
    full = glyphs.render_glyph_images(plan, image_size=12, instances_per_font=1, seed=0)
    alone = glyphs.render_glyph_images({"latin_R": plan["latin_R"]}, image_size=12, instances_per_font=1, seed=0)
    assert torch.equal(full["latin_R"], alone["latin_R"])


def test_unknown_glyph_class_is_named():
    with pytest.raises(ValueError, match="latin_lowercase_ae"):
        glyphs.glyph_plan(["latin_lowercase_ae"])


# --- Omniglot -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_store(tmp_path_factory):
    root = shared_omniglot_root()
    out = tmp_path_factory.mktemp("omniglot")
    prepare_dataset("omniglot", out, root=root, download=False)
    return DatasetStore(out)


def test_omniglot_loads_1623_classes_of_20(omniglot_store):
    names = all_classes(omniglot_store)
    assert len(names) == 1623
    assert names[0] == "char_0001" and max(names) == "char_1623"
    assert [len(omniglot_store.classes(s)) for s in SPLITS] == [771, 193, 659]
    images = omniglot_store.load_classes(["char_0001", "char_1623"])
    assert all(x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8 for x in images)
    assert images[0].max() == 255 and images[0].float().mean() < 60, "ink should be white on black"


def test_omniglot_split_keeps_background_and_evaluation_apart(omniglot_store):
    train, val, test = (omniglot_store.classes(s) for s in SPLITS)
    assert max(train) < min(val), "meta-val is the last part of the background characters"
    assert test == [f"char_{i:04d}" for i in range(965, 1624)]
    assert_disjoint_splits(omniglot_store)


def test_omniglot_from_the_archive_layout(tmp_path):
    for part, alphabets in (("images_background", ["Greek", "Latin", "N_Ko"]), ("images_evaluation", ["Tengwar"])):
        for alphabet in alphabets:
            for character in ("character01", "character02"):
                folder = tmp_path / "raw" / part / alphabet / character
                folder.mkdir(parents=True)
                for drawer in range(3):
                    ink = np.ones((105, 105), dtype=bool)
                    ink[40:60, 20 + drawer : 80] = False
                    Image.fromarray(ink).save(folder / f"0001_{drawer + 1:02d}.png")
    info = prepare_dataset("omniglot", tmp_path / "store", root=tmp_path / "raw", download=False, val_fraction=0.34)
    assert info.splits["meta_val"] == ["N_Ko/character01", "N_Ko/character02"]
    assert info.splits["meta_test"] == ["Tengwar/character01", "Tengwar/character02"]
    image = DatasetStore(tmp_path / "store").images("Greek/character01")
    assert image.shape == (3, 1, 28, 28) and image[0, 0, 13, 14] == 255 and image[0, 0, 0, 0] == 0


# --- image folders and mini-ImageNet --------------------------------------------------------------


def test_imagefolder_respects_fractions_and_is_deterministic(tmp_path):
    write_png_classes(tmp_path / "raw", [f"class_{i:02d}" for i in range(10)], per_class=3)
    options = dict(root=tmp_path / "raw", image_size=8, val_fraction=0.2, test_fraction=0.3, seed=5)
    info = prepare_dataset("imagefolder", tmp_path / "a", **options)
    prepare_dataset("imagefolder", tmp_path / "b", **options)
    assert [len(info.splits[s]) for s in SPLITS] == [5, 2, 3]
    assert info.channels == 1 and info.image_size == 8
    assert store_digest(tmp_path / "a") == store_digest(tmp_path / "b")
    assert DatasetStore(tmp_path / "a").images("class_00").shape == (3, 1, 8, 8)


def test_imagefolder_detects_colour(tmp_path):
    write_png_classes(tmp_path / "raw", ["a", "b", "c"], per_class=2, mode="RGB")
    info = prepare_dataset("imagefolder", tmp_path / "store", root=tmp_path / "raw", image_size=6)
    assert info.channels == 3 and len(info.mean) == 3


def test_miniimagenet_from_split_folders(tmp_path):
    layout = {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06"]}
    for split, wnids in layout.items():
        write_png_classes(tmp_path / "raw" / split, wnids, per_class=2, size=(30, 20), mode="RGB")
    info = prepare_dataset("miniimagenet", tmp_path / "store", root=tmp_path / "raw", image_size=10)
    assert info.splits == {"meta_train": ["n01", "n02", "n03"], "meta_val": ["n04"], "meta_test": ["n05", "n06"]}
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert DatasetStore(tmp_path / "store").images("n05").shape == (2, 3, 10, 10)


def test_miniimagenet_from_ravi_larochelle_csvs(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    layout = {"train.csv": ["n10", "n11"], "val.csv": ["n12"], "test.csv": ["n13"]}
    for csv_name, wnids in layout.items():
        with open(raw / csv_name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for wnid in wnids:
                for i in (2, 1):
                    filename = f"{wnid}{i:08d}.jpg"
                    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(raw / "images" / filename)
                    writer.writerow([filename, wnid])
    info = prepare_dataset("miniimagenet", tmp_path / "store", root=raw, image_size=8)
    assert info.splits == {"meta_train": ["n10", "n11"], "meta_val": ["n12"], "meta_test": ["n13"]}
    first = np.asarray(Image.open(raw / "images" / "n1000000001.jpg").convert("RGB").resize((8, 8), Image.BILINEAR))
    stored = DatasetStore(tmp_path / "store").images("n10")
    assert stored.shape == (2, 3, 8, 8)
    assert np.array_equal(stored[0].permute(1, 2, 0).numpy(), first), "images are sorted by file name"


# --- CIFAR-FS -------------------------------------------------------------------------------------


def test_cifarfs_split_lists_are_the_standard_64_16_20():
    train, val, test = (set(cifarfs.CIFARFS_SPLITS[s]) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (64, 16, 20)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(cifarfs.CIFAR100_CLASSES)
    assert len(cifarfs.CIFAR100_CLASSES) == 100 and list(cifarfs.CIFAR100_CLASSES) == sorted(cifarfs.CIFAR100_CLASSES)
    assert {"otter", "sea", "maple_tree"} <= val and {"baby", "worm", "sweet_pepper"} <= test


def write_fake_cifar100(root, per_class_train=2, per_class_test=1):
    """CIFAR-100 python-version pickles; every pixel of an image holds its class index (+128 for test)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class, offset in (("train", per_class_train, 0), ("test", per_class_test, 128)):
        labels = [c for _ in range(per_class) for c in range(100)]
        data = np.array([[label + offset] * 3072 for label in labels], dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": list(cifarfs.CIFAR100_CLASSES), "coarse_label_names": []}, handle)


def test_cifarfs_loads_a_cifar100_python_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    write_fake_cifar100(tmp_path / "raw")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    info = prepare_dataset("cifarfs", tmp_path / "store", root=tmp_path / "raw" / "cifar-100-python", download=False)
    assert [len(info.splits[s]) for s in SPLITS] == [64, 16, 20]
    assert info.mean == cifarfs.CIFARFS_MEAN
    otter = DatasetStore(tmp_path / "store").images("otter")
    index = cifarfs.CIFAR100_CLASSES.index("otter")
    assert otter.shape == (3, 3, 32, 32)
    assert otter[:, 0, 0, 0].tolist() == [index, index, index + 128], "train images first, then test"


def test_cifarfs_from_the_shared_npz(tmp_path):
    """The real file: 64 / 16 / 20 classes of 600 RGB images, CIFAR-100's pixel statistics, superclass groups."""
    root = shared_cifar100_root()
    info = prepare_dataset("cifarfs", tmp_path / "store", root=root, download=False)
    assert [len(info.splits[s]) for s in SPLITS] == [64, 16, 20]
    assert (info.image_size, info.channels) == (32, 3)
    store = DatasetStore(tmp_path / "store")
    pixels = torch.cat([store.images(name) for name in cifarfs.CIFAR100_CLASSES]).float() / 255
    assert pixels.shape == (60000, 3, 32, 32)
    mean = pixels.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.5074, 0.4867, 0.4411]), atol=2e-4), mean
    assert store.info.groups["otter"] == "aquatic_mammals" and store.info.groups["worm"] == "non-insect_invertebrates"
    # the npz file itself is accepted as root, and gives the same store
    again = prepare_dataset("cifarfs", tmp_path / "again", root=root / "cifar100_by_class.npz", download=False)
    assert again.splits == info.splits
    assert torch.equal(DatasetStore(tmp_path / "again").images("whale"), store.images("whale"))


def test_cifarfs_npz_with_a_wrong_layout_is_named(tmp_path):
    np.savez(tmp_path / "cifar100_by_class.npz", images=np.zeros((100, 2, 32, 32, 3), np.uint8),
             classes=np.array(cifarfs.CIFAR100_CLASSES))
    with pytest.raises(StoreFormatError, match=r"'images' is uint8 \[100, 2, 32, 32, 3\], expected uint8 \[classes, instances, 3, 32, 32\]"):
        prepare_dataset("cifarfs", tmp_path / "store", root=tmp_path, download=False)
    np.savez(tmp_path / "cifar100_by_class.npz", images=np.zeros((100, 2, 3, 32, 32), np.uint8),
             classes=np.array(sorted(cifarfs.CIFAR100_CLASSES, reverse=True)))
    with pytest.raises(StoreFormatError, match="'classes' differ from CIFAR-100's fine labels in their order"):
        prepare_dataset("cifarfs", tmp_path / "store", root=tmp_path, download=False)


# --- missing data ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("omniglot", "images_background.npz"),
        ("cifarfs", "cifar100_by_class.npz (images uint8"),
        ("miniimagenet", "train.csv"),
        ("imagefolder", "<class name>"),
    ],
)
def test_missing_dataset_names_the_path_and_how_to_get_it(tmp_path, source, hint):
    missing = tmp_path / "nowhere"
    options = {"root": missing}
    if source in ("omniglot", "cifarfs"):
        options["download"] = False
    with pytest.raises(DatasetNotFoundError) as error:
        prepare_dataset(source, tmp_path / "store", **options)
    assert str(missing) in str(error.value) and hint in str(error.value)
    assert not (tmp_path / "store").exists()


# --- pictures -------------------------------------------------------------------------------------


def test_class_grid_is_a_png_with_one_row_per_class(tmp_path):
    prepare_dataset("glyphs", tmp_path / "glyphs", classes=GLYPH_SUBSET[:4], instances_per_font=1, image_size=12)
    store = DatasetStore(tmp_path / "glyphs")
    path = save_class_grid(store, GLYPH_SUBSET[:3], per_class=5, path=tmp_path / "pics" / "grid.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > 100
    with pytest.raises(ValueError, match="fewer than per_class"):
        save_class_grid(store, GLYPH_SUBSET[:1], per_class=100, path=tmp_path / "bad.png")
