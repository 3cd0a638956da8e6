import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dfml.config import ParamsError, check_params
from dfml.data import DatasetStore, write_store
from dfml.pool import (PoolError, assign_classes, load_member, load_pool, member_paths, member_settings,
                       plan_member, save_member)
from dfml.pretrain import pretrain_member

PARAMS = {
    "seed": 3,
    "run_scenarios": ["ss"],
    "datasets": {"a": {"source": "glyphs"}, "b": {"source": "omniglot"}},
    "models": {"conv4": {"arch": "conv4", "width": 8}, "r10": {"arch": "resnet10", "width": 4},
               "r18": {"arch": "resnet18", "width": 4}},
    "scenarios": {
        "ss": {"datasets": ["a"], "architectures": ["conv4"], "members_per_dataset": 3},
        "sh": {"datasets": ["a"], "architectures": ["conv4", "r10", "r18"], "members_per_dataset": 4},
        "mh": {"datasets": ["a", "b"], "architectures": ["conv4", "r10"], "members_per_dataset": 2,
               "class_assignment": "overlapping"},
    },
    "pretrain": {"epochs": 3, "batch_size": 16},
}
CLASSES = {"a": [f"a{i:02d}" for i in range(20)], "b": [f"b{i:02d}" for i in range(12)]}


@pytest.fixture(scope="module")
def params():
    return check_params(PARAMS)


def test_schema_fills_defaults(params):
    assert params["scenarios"]["ss"]["classes_per_member"] == 5
    assert params["scenarios"]["ss"]["class_assignment"] == "disjoint"
    assert params["pretrain"]["heldout_fraction"] == 0.2
    assert params["pretrain"]["conv4"]["optimizer"] == "adam"
    assert params["pretrain"]["resnet"]["optimizer"] == "sgd"


def test_invalid_value_names_the_key():
    bad = json.loads(json.dumps(PARAMS))
    bad["pretrain"]["epochs"] = 0
    with pytest.raises(ParamsError, match=r"'pretrain\.epochs'.*less than the minimum of 1"):
        check_params(bad)
    bad = json.loads(json.dumps(PARAMS))
    bad["scenarios"]["ss"]["class_assignment"] = "random"
    with pytest.raises(ParamsError, match=r"scenarios\.ss\.class_assignment.*'random' is not one of"):
        check_params(bad)


def test_unknown_reference_lists_the_defined_names():
    bad = json.loads(json.dumps(PARAMS))
    bad["scenarios"]["sh"]["architectures"].append("vit")
    with pytest.raises(ParamsError, match=r"scenarios\.sh\.architectures: unknown model 'vit'; defined models"):
        check_params(bad)


def test_disjoint_blocks_are_contiguous_sorted_classes():
    shuffled = list(reversed(CLASSES["a"]))
    assert assign_classes(shuffled, 1, 5, "disjoint", 0) == tuple(CLASSES["a"][5:10])
    with pytest.raises(ValueError, match="at most 4"):
        assign_classes(shuffled, 4, 5, "disjoint", 0)


def test_disjoint_last_block_may_be_shorter_as_in_purer():
    """64 CIFAR-FS classes: 12 blocks of 5, then member 12 gets the last 4; a 1-class block is refused."""
    classes = [f"c{i:02d}" for i in range(64)]
    assert assign_classes(classes, 12, 5, "disjoint", 0) == tuple(classes[60:])
    with pytest.raises(ValueError, match="member 13 would get 0 of classes 65..69.*at most 13"):
        assign_classes(classes, 13, 5, "disjoint", 0)
    with pytest.raises(ValueError, match="member 14 would get 1 of classes 70..74.*at most 14"):
        assign_classes([f"c{i:02d}" for i in range(71)], 14, 5, "disjoint", 0)


def test_overlapping_is_seeded_random(params):
    first = assign_classes(CLASSES["a"], 0, 5, "overlapping", 11)
    assert first == assign_classes(CLASSES["a"], 0, 5, "overlapping", 11)
    assert len(set(first)) == 5 and set(first) <= set(CLASSES["a"])
    assert first != assign_classes(CLASSES["a"], 0, 5, "overlapping", 12)


@pytest.mark.parametrize("scenario, archs, datasets", [
    ("ss", ["conv4"] * 3, ["a"] * 3),
    ("sh", ["conv4", "resnet10", "resnet18", "conv4"], ["a"] * 4),
    ("mh", ["conv4", "resnet10", "conv4", "resnet10"], ["a", "a", "b", "b"]),
])
def test_scenario_members_have_configured_architectures_and_datasets(params, scenario, archs, datasets):
    specs = [plan_member(member_settings(params, scenario, i), CLASSES[datasets[i]]) for i in range(len(archs))]
    assert [s.architecture["name"] for s in specs] == archs
    assert [s.dataset for s in specs] == datasets
    assert all(set(s.classes) <= set(CLASSES[s.dataset]) for s in specs)


def test_member_settings_only_carry_what_affects_the_member(params):
    changed = json.loads(json.dumps(params))
    changed["pretrain"]["resnet"]["lr"] = 0.5
    changed["scenarios"]["sh"]["members_per_dataset"] = 5
    assert member_settings(changed, "sh", 0) == member_settings(params, "sh", 0)  # conv4 member
    assert member_settings(changed, "sh", 1) != member_settings(params, "sh", 1)  # resnet10 member


def make_store(root, classes, per_class=10, size=16):
    gen = torch.Generator().manual_seed(1)
    images = {}
    for i, name in enumerate(classes):
        base = torch.zeros(1, 1, size, size, dtype=torch.uint8)
        base[..., (i % 4) * 4:(i % 4) * 4 + 4, (i // 4) * 3:(i // 4) * 3 + 3] = 255  # class = bright block position
        noise = torch.randint(0, 40, (per_class, 1, size, size), generator=gen, dtype=torch.uint8)
        images[name] = base.expand(per_class, -1, -1, -1) // 2 + noise
    splits = {"meta_train": classes[:-4], "meta_val": classes[-4:-2], "meta_test": classes[-2:]}
    write_store(root, "toy", images, splits, source="test")
    return DatasetStore(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("pool")
    store = make_store(root / "toy", [f"a{i:02d}" for i in range(16)])
    settings = member_settings(params, "ss", 1)
    spec = plan_member(settings, store.classes("meta_train"))
    result = pretrain_member(store, spec, settings["pretrain"], progress=False)
    weights, card = member_paths(root / "pool", 1)
    save_member(result.model, spec, weights, card, heldout_accuracy=result.heldout_accuracy)
    return root / "pool", result, spec


def test_pretraining_is_deterministic_and_learns(tmp_path, trained, params):
    pool_dir, result, spec = trained
    assert result.heldout_accuracy > 0.5  # 5 classes, chance is 0.2
    store = DatasetStore(pool_dir.parent / "toy")
    again = pretrain_member(store, spec, member_settings(params, "ss", 1)["pretrain"], progress=False)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_pool_round_trip(trained):
    pool_dir, result, spec = trained
    (member,) = load_pool(pool_dir)
    assert member.classes == list(spec.classes)
    assert member.card["heldout_accuracy"] == result.heldout_accuracy
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(member.model(x), result.model(x))
    assert not member.model.training


def copy_pool(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_corrupt_weights_are_rejected_naming_the_file(trained, tmp_path):
    pool = copy_pool(trained[0], tmp_path / "p")
    weights = pool / "member_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\x00" * 10
    weights.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=r"member_1\.safetensors: checksum differs"):
        load_pool(pool)
    card = json.loads((pool / "member_1.json").read_text())
    del card["weights_sha256"]
    (pool / "member_1.json").write_text(json.dumps(card))
    weights.write_bytes(b"garbage that is not safetensors")
    with pytest.raises(PoolError, match=r"member_1\.safetensors: not a readable safetensors file"):
        load_pool(pool)


def test_card_weights_mismatch_is_named(trained, tmp_path):
    pool = copy_pool(trained[0], tmp_path / "p")
    card_path = pool / "member_1.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["width"] = 16
    card_path.write_text(json.dumps(card))
    with pytest.raises(PoolError, match=r"backbone\.blocks\.0\.conv\.weight has shape \(8, 1, 3, 3\).*needs \(16, 1, 3, 3\)"):
        load_member(card_path)
    card["architecture"]["width"] = 8
    card["classes"] = card["classes"] + ["extra"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(PoolError, match="head has 5 outputs but the card lists 6 classes"):
        load_member(card_path)


def test_pickled_weights_are_refused(trained, tmp_path):
    pool = copy_pool(trained[0], tmp_path / "p")
    card_path = pool / "member_1.json"
    card = json.loads(card_path.read_text())
    state = {k: v for k, v in trained[1].model.state_dict().items()}
    torch.save(state, pool / "member_1.pt")
    card["weights_file"] = "member_1.pt"
    card.pop("weights_sha256")
    card_path.write_text(json.dumps(card))
    with pytest.raises(PoolError, match="refusing to load a pickled model file"):
        load_member(card_path)
    (pool / "sneaky.safetensors").write_bytes(pickle.dumps(state))
    card["weights_file"] = "sneaky.safetensors"
    card_path.write_text(json.dumps(card))
    with pytest.raises(PoolError, match="refusing to unpickle"):
        load_member(card_path)


def test_missing_pool_says_how_to_build_it(tmp_path):
    with pytest.raises(PoolError, match="no member_<i>.json cards found"):
        load_pool(tmp_path)


def test_extra_tensor_in_weights_is_named(trained, tmp_path):
    pool = copy_pool(trained[0], tmp_path / "p")
    state = dict(trained[1].model.state_dict())
    state["backdoor"] = torch.zeros(1)
    save_file(state, pool / "member_1.safetensors")
    card = json.loads((pool / "member_1.json").read_text())
    card.pop("weights_sha256")
    (pool / "member_1.json").write_text(json.dumps(card))
    with pytest.raises(PoolError, match=r"unexpected \['backdoor'\]"):
        load_pool(pool)


def test_a_truncated_member_file_is_refused_naming_it(trained, tmp_path):
    pool = copy_pool(trained[0], tmp_path / "p")
    weights = pool / "member_1.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(PoolError, match=r"member_1\.safetensors: checksum differs"):
        load_pool(pool)
    card = json.loads((pool / "member_1.json").read_text())
    del card["weights_sha256"]  # without the checksum, reading the file itself fails, still named
    (pool / "member_1.json").write_text(json.dumps(card))
    with pytest.raises(PoolError, match=r"member_1\.safetensors: not a readable safetensors file"):
        load_pool(pool)
