import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dfml.data import DatasetNotFoundError, DatasetStore, StoreFormatError, write_store
from dfml.data.store import atomic_save_tensors, canonical_safetensors
from dfml.data.episodes import EpisodeSampler, episode_rng, fixed_episodes, load_episodes, save_episodes


def make_store(root, n_classes=12, per_class=20, size=8, channels=1):
    gen = torch.Generator().manual_seed(0)
    names = [f"c{i:02d}" for i in range(n_classes)]
    # every image of class i is filled with value i so the tests can read a label back from pixels
    images = {name: torch.full((per_class, channels, size, size), i, dtype=torch.uint8) for i, name in enumerate(names)}
    images[names[0]] = torch.randint(0, 256, (per_class, channels, size, size), generator=gen, dtype=torch.uint8)
    splits = {"meta_train": names[:6], "meta_val": names[6:9], "meta_test": names[9:]}
    write_store(root, "toy", images, splits, source="test", mean=[0.0] * channels, std=[1.0 / 255] * channels)
    return DatasetStore(root)


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "toy")


def test_store_round_trip(store):
    assert store.classes("meta_train") == [f"c{i:02d}" for i in range(6)]
    assert store.images("c03").dtype == torch.uint8
    assert store.images("c03").shape == (20, 1, 8, 8)
    info = json.loads((store.root / "splits.json").read_text())
    assert info["num_classes"] == {"meta_train": 6, "meta_val": 3, "meta_test": 3}


def test_tensor_files_are_canonical_bytes_that_safetensors_reads_back(tmp_path):
    tensors = {"zeta": torch.arange(5, dtype=torch.float32), "alpha": torch.ones(3, dtype=torch.uint8)}
    metadata = {f"key{i}": f"value {i} é" for i in range(8)}
    blobs = {canonical_safetensors(tensors, metadata) for _ in range(10)}
    assert len(blobs) == 1
    blob = blobs.pop()
    header_size = int.from_bytes(blob[:8], "little")
    assert header_size % 8 == 0 and list(json.loads(blob[8 : 8 + header_size])) == sorted(["__metadata__", *tensors])
    path = tmp_path / "t.safetensors"
    atomic_save_tensors(tensors, path, metadata=metadata)
    assert path.read_bytes() == blob
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)


def test_bad_split_name_is_explained(store):
    with pytest.raises(ValueError, match="unknown split 'train'.*meta_train, meta_val, meta_test"):
        store.classes("train")


def test_missing_store_says_how_to_build_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"no canonical dataset store at .*nowhere.*dfml prepare"):
        DatasetStore(tmp_path / "nowhere")


def test_overlapping_splits_are_rejected(tmp_path):
    images = {n: torch.zeros(2, 1, 4, 4, dtype=torch.uint8) for n in "abc"}
    with pytest.raises(StoreFormatError, match="class 'a' is in both meta_train and meta_val"):
        write_store(tmp_path, "bad", images, {"meta_train": ["a", "b"], "meta_val": ["a"], "meta_test": ["c"]}, "t")


def test_non_uint8_images_are_rejected(tmp_path):
    images = {n: torch.zeros(2, 1, 4, 4) for n in "abc"}
    with pytest.raises(StoreFormatError, match="dtype torch.float32, expected uint8"):
        write_store(tmp_path, "bad", images, {"meta_train": ["a"], "meta_val": ["b"], "meta_test": ["c"]}, "t")


def test_episode_shapes_labels_and_disjointness(store):
    sampler = EpisodeSampler(store, split="meta_train", way=5, shot=2, query=3)
    rng = np.random.default_rng(0)
    spec = sampler.sample_spec(rng)
    assert len(set(spec.classes)) == 5 and set(spec.classes) <= set(store.classes("meta_train"))
    for s, q in zip(spec.support, spec.query):
        assert len(s) == 2 and len(q) == 3 and not set(s) & set(q)
    episode = sampler.materialize(spec)
    assert episode.support_x.shape == (10, 1, 8, 8) and episode.query_x.shape == (15, 1, 8, 8)
    assert episode.support_x.dtype == torch.float32
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episode.query_y.tolist() == [k for k in range(5) for _ in range(3)]
    # pixels of classes c01..c05 hold their class number: labels must point at the right class
    for x, y in zip(episode.query_x, episode.query_y):
        name = spec.classes[int(y)]
        if name != "c00":
            assert int(x[0, 0, 0]) == int(name[1:])


def test_class_subset_sampler_only_uses_those_classes(store):
    members = ["c02", "c04", "c05", "c01", "c03"]
    sampler = EpisodeSampler(store, classes=members, way=5, shot=1, query=4)
    for i in range(5):
        assert set(sampler.sample_spec(np.random.default_rng(i)).classes) == set(members)


def test_fixed_episodes_identical_across_calls_and_prefix_stable(store):
    sampler = EpisodeSampler(store, split="meta_test", way=3, shot=1, query=5)
    first = fixed_episodes(sampler, 20, seed=7)
    assert first == fixed_episodes(sampler, 20, seed=7)
    assert first[:5] == fixed_episodes(sampler, 5, seed=7)
    assert first != fixed_episodes(sampler, 20, seed=8)
    a, b = sampler.materialize(first[3]), sampler.materialize(first[3])
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.support_y, b.support_y)


def test_episode_specs_round_trip_through_json(store, tmp_path):
    sampler = EpisodeSampler(store, split="meta_val", way=3, shot=2, query=2)
    specs = fixed_episodes(sampler, 4, seed=1)
    save_episodes(tmp_path / "ep.json", specs, split="meta_val")
    assert load_episodes(tmp_path / "ep.json") == specs


def test_infeasible_episodes_are_explained(store):
    with pytest.raises(ValueError, match="5-way episodes need at least 5 classes, meta_val of toy has 3"):
        EpisodeSampler(store, split="meta_val", way=5)
    with pytest.raises(ValueError, match="has 20 images, a 5-shot 16-query episode needs 21"):
        EpisodeSampler(store, split="meta_train", way=5, shot=5, query=16)
    with pytest.raises(ValueError, match="exactly one of split= or classes="):
        EpisodeSampler(store, way=5)


def test_episode_streams_are_independent_of_each_other():
    assert episode_rng(0, 1).integers(1 << 30) == episode_rng(0, 1).integers(1 << 30)
    assert episode_rng(0, 1).integers(1 << 30) != episode_rng(0, 2).integers(1 << 30)


def test_sampler_resizes_and_converts_channels_for_mixed_datasets(store):
    sampler = EpisodeSampler(store, split="meta_train", way=2, shot=1, query=1, image_size=12, channels=3)
    episode = sampler.sample(np.random.default_rng(0))
    assert episode.support_x.shape == (2, 3, 12, 12)
    assert torch.equal(episode.support_x[:, 0], episode.support_x[:, 2])
