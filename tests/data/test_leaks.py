"""No concept leak across datasets: class groups in every store, script families, and the pool of a
scenario that mixes datasets (refused, or cleaned with cross_dataset_leaks: exclude; the shipped MH)."""

import copy
import csv
import json
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
import torch
import yaml
from conftest import REPO_ROOT, shared_cifar100_root, shared_omniglot_root

from dfml.config import ParamsError, check_params
from dfml.data import DatasetStore, StoreFormatError, write_store
from dfml.data.families import GROUP_FAMILIES, family_of
from dfml.data.sources import cifarfs, glyphs, omniglot, prepare_dataset
from dfml.leakage import CrossDatasetLeakError, member_pool_classes, pool_classes, evaluated_families
from dfml.models import build_model
from dfml.pool import MemberSpec, member_paths, member_settings, plan_member, save_member

UNICODE_WORD = {"latin": "LATIN", "ipa": "LATIN", "greek": "GREEK", "cyrillic": "CYRILLIC", "digits": "DIGIT"}


def toy_store(root, name, splits, groups=None):
    images = {c: torch.zeros(2, 1, 4, 4, dtype=torch.uint8) for names in splits.values() for c in names}
    write_store(root / name, name, images, splits, source="test", groups=groups)
    return DatasetStore(root / name)


def toy_stores(root):
    """letters: a Cyrillic and a Latin pool class, Greek meta-test; scans: a Greek pool class, Old Church
    Slavonic meta-test. Leaks: letters' Cyrillic class, scans' Greek class."""
    letters = toy_store(root, "letters", {"meta_train": ["cyr_be", "lat_a", "sym_at"], "meta_val": ["lat_b"],
                                          "meta_test": ["gr_pi"]},
                        {"cyr_be": "cyrillic", "lat_a": "latin", "sym_at": "symbols", "lat_b": "latin",
                         "gr_pi": "greek"})
    scans = toy_store(root, "scans", {"meta_train": ["char_01", "char_02"], "meta_val": ["char_03"],
                                      "meta_test": ["char_04"]},
                      {"char_01": "Greek", "char_02": "Tifinagh", "char_03": "Latin",
                       "char_04": "Old_Church_Slavonic_(Cyrillic)"})
    return {"letters": letters, "scans": scans}


# --- groups in every store -----------------------------------------------------------------------------


def test_every_glyph_class_has_its_unicode_script_as_group():
    for name, char in glyphs.GLYPH_CLASSES.items():
        script = glyphs.glyph_script(name)
        if script in UNICODE_WORD:
            assert unicodedata.name(char).startswith(UNICODE_WORD[script]), (name, unicodedata.name(char))
        else:
            assert script == "symbols" and not unicodedata.name(char).startswith(tuple(UNICODE_WORD.values())), name


def test_glyph_store_records_the_groups(tmp_path):
    classes = ["cyrillic_Be", "greek_Pi", "latin_A", "ipa_esh", "symbol_at", "digit_3"]
    prepare_dataset("glyphs", tmp_path / "g", classes=classes, image_size=8, instances_per_font=1)
    saved = json.loads((tmp_path / "g" / "splits.json").read_text())["groups"]
    assert saved == {"cyrillic_Be": "cyrillic", "digit_3": "digits", "greek_Pi": "greek", "ipa_esh": "ipa",
                     "latin_A": "latin", "symbol_at": "symbols"}
    assert DatasetStore(tmp_path / "g").groups() == saved


def test_omniglot_alphabet_table_matches_the_npz_pair():
    for alphabets, count, characters in ((omniglot.BACKGROUND_ALPHABETS, 30, 964),
                                         (omniglot.EVALUATION_ALPHABETS, 20, 659)):
        assert len(alphabets) == count and len({name for name, _ in alphabets}) == count
        assert sum(size for _, size in alphabets) == characters


def test_omniglot_npz_of_another_size_fails_clearly():
    with pytest.raises(StoreFormatError, match=r"images_background\.npz holds 3 characters.*964.*cannot tell which "
                                               r"alphabet.*official archives"):
        omniglot.character_alphabets(["char_0001", "char_0002", "char_0003"], [f"char_{i:04d}" for i in range(659)])


def test_omniglot_archive_layout_groups_are_the_alphabet_folders():
    assert omniglot.character_alphabets(["Greek/character01", "N_Ko/character02"], ["Tengwar/character01"]) == {
        "Greek/character01": "Greek", "N_Ko/character02": "N_Ko", "Tengwar/character01": "Tengwar"}


@pytest.fixture(scope="module")
def omniglot_store(tmp_path_factory):
    root = shared_omniglot_root()
    out = tmp_path_factory.mktemp("data") / "omniglot"
    prepare_dataset("omniglot", out, root=root, image_size=8, download=False)
    return DatasetStore(out)


def test_real_omniglot_characters_belong_to_their_official_alphabets(omniglot_store):
    groups = omniglot_store.groups()
    sizes = dict(omniglot.BACKGROUND_ALPHABETS + omniglot.EVALUATION_ALPHABETS)
    assert Counter(groups.values()) == sizes
    # ids of the official archive's file names, e.g. Cyrillic/character11/0228_06.png
    assert [groups[f"char_{i:04d}"] for i in (1, 203, 228, 394, 683, 708, 709, 861, 963)] == [
        "Arcadian", "Braille", "Cyrillic", "Greek", "Latin", "Latin", "Alphabet_of_the_Magi", "Sanskrit", "Tifinagh"]
    assert [groups[f"char_{i:04d}"] for i in (965, 1229, 1276, 1389, 1433, 1569, 1611)] == [
        "Angelic", "Kannada", "Malayalam", "Old_Church_Slavonic_(Cyrillic)", "Old_Church_Slavonic_(Cyrillic)",
        "Tibetan", "ULOG"]
    test_alphabets = {groups[c] for c in omniglot_store.classes("meta_test")}
    assert len(test_alphabets) == 20 and "Old_Church_Slavonic_(Cyrillic)" in test_alphabets


def test_cifarfs_groups_are_the_cifar100_superclasses():
    assert len(cifarfs.CIFAR100_SUPERCLASSES) == 20
    assert all(len(names) == 5 for names in cifarfs.CIFAR100_SUPERCLASSES.values())
    assert sorted(cifarfs.CIFAR100_SUPERCLASS_OF) == sorted(cifarfs.CIFAR100_CLASSES)
    assert cifarfs.CIFAR100_SUPERCLASS_OF["otter"] == "aquatic_mammals"


def test_a_store_without_known_groups_makes_every_class_its_own(tmp_path):
    store = toy_store(tmp_path, "plain", {"meta_train": ["a", "b"], "meta_val": ["c"], "meta_test": ["d"]})
    assert store.groups() == {"a": "a", "b": "b", "c": "c", "d": "d"}
    with pytest.raises(StoreFormatError, match=r"without a group \['d'\]"):
        toy_store(tmp_path, "bad", {"meta_train": ["a"], "meta_val": ["c"], "meta_test": ["d"]}, {"a": "x", "c": "y"})


def test_a_store_from_before_groups_still_opens_and_asks_for_a_rebuild(tmp_path):
    store = toy_store(tmp_path, "old", {"meta_train": ["a"], "meta_val": ["b"], "meta_test": ["c"]})
    info = json.loads((store.root / "splits.json").read_text())
    del info["groups"]
    (store.root / "splits.json").write_text(json.dumps(info))
    old = DatasetStore(store.root)
    assert old.classes("meta_train") == ["a"]
    with pytest.raises(StoreFormatError, match=r"no class groups.*scripts/prepare_data\.py --dataset old"):
        old.groups()


# --- script families -----------------------------------------------------------------------------------


def test_families_join_one_script_across_sources():
    assert family_of("latin") == family_of("ipa") == family_of("Latin") == "latin"
    assert family_of("greek") == family_of("Greek") == "greek"
    assert family_of("cyrillic") == family_of("Cyrillic") == family_of("Old_Church_Slavonic_(Cyrillic)") == "cyrillic"
    assert family_of("Syriac_(Estrangelo)") == family_of("Syriac_(Serto)")


def test_other_alphabets_and_unknown_groups_are_families_of_their_own():
    for alphabet in ("Glagolitic", "Futurama", "Aurek-Besh", "Braille", "Anglo-Saxon_Futhorc", "Tengwar"):
        assert family_of(alphabet) == alphabet
    assert family_of("n01532829") == "n01532829"
    glyph_scripts = set(glyphs.SCRIPT_OF_PREFIX.values())
    assert glyph_scripts <= set(GROUP_FAMILIES)
    alphabets = [name for name, _ in omniglot.BACKGROUND_ALPHABETS + omniglot.EVALUATION_ALPHABETS]
    shared = {family_of(a) for a in alphabets} & {family_of(s) for s in glyph_scripts}
    assert shared == {"latin", "greek", "cyrillic"}


# --- the pool of a mixed scenario -----------------------------------------------------------------------


def test_mixed_pool_with_leaks_is_refused_by_default(tmp_path):
    with pytest.raises(CrossDatasetLeakError) as error:
        pool_classes("mix", "letters", toy_stores(tmp_path))
    message = str(error.value)
    assert message.startswith("scenario mix:")
    assert "letters: 1 meta-train class of family cyrillic (cyr_be); family cyrillic is in the meta-test of scans" \
        in message
    assert "scans: 1 meta-train class of family greek (char_01); family greek is in the meta-test of letters" \
        in message
    assert "scenarios.mix.cross_dataset_leaks: exclude" in message


def test_exclude_drops_leaking_classes_before_members_are_assigned(tmp_path):
    stores = toy_stores(tmp_path)
    candidates, excluded = pool_classes("mix", "letters", stores, "exclude")
    assert candidates == ["lat_a", "sym_at"]
    assert [leak.to_json() for leak in excluded] == [{
        "dataset": "letters", "class": "cyr_be", "group": "cyrillic", "family": "cyrillic", "tested_in": ["scans"],
        "reason": "family cyrillic is in the meta-test of scans"}]
    assert pool_classes("mix", "scans", stores, "exclude")[0] == ["char_02"]
    # meta-val does not count: the Latin class of scans' meta-val leaves letters' Latin pool class alone
    assert "lat_a" in candidates


def test_a_single_dataset_pool_is_never_checked(tmp_path):
    store = toy_store(tmp_path, "old", {"meta_train": ["a", "b"], "meta_val": ["c"], "meta_test": ["d"]})
    info = json.loads((store.root / "splits.json").read_text())
    del info["groups"]  # a store written before groups: fine when nothing is mixed
    (store.root / "splits.json").write_text(json.dumps(info))
    assert pool_classes("ss", "old", {"old": DatasetStore(store.root)}) == (["a", "b"], [])


def test_the_option_is_validated_and_defaults_to_refuse():
    params = {"run_scenarios": ["s"], "datasets": {"a": {"source": "glyphs"}}, "models": {"m": {"arch": "conv4"}},
              "scenarios": {"s": {"datasets": ["a"], "architectures": ["m"], "members_per_dataset": 1}}}
    assert check_params(params)["scenarios"]["s"]["cross_dataset_leaks"] == "refuse"
    params["scenarios"]["s"]["cross_dataset_leaks"] = "ignore"
    with pytest.raises(ParamsError, match=r"scenarios\.s\.cross_dataset_leaks.*'ignore' is not one of"):
        check_params(params)


def test_the_pretrain_script_refuses_a_leaking_pool(tmp_path):
    toy_stores(tmp_path)
    params = check_params({
        "run_scenarios": ["mix"], "datasets": {"letters": {"source": "glyphs"}, "scans": {"source": "omniglot"}},
        "models": {"m": {"arch": "conv4", "width": 2}},
        "scenarios": {"mix": {"datasets": ["letters", "scans"], "architectures": ["m"], "members_per_dataset": 1,
                              "classes_per_member": 2}}})
    settings = member_settings(params, "mix", 0)
    proc = subprocess.run([sys.executable, "scripts/pretrain_member.py", "--scenario", "mix", "--member", "0",
                           "--settings-json", json.dumps(settings), "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "pool")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "scenario mix:" in proc.stderr and "cross_dataset_leaks: exclude" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pool").exists()


# --- the shipped MH -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_params():
    return check_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="module")
def mh_data_root(omniglot_store, shipped_params):
    """data/glyphs and data/omniglot as params.yaml builds them, but tiny images (splits and groups depend
    only on the classes and the seed)."""
    root = omniglot_store.root.parent
    entry = shipped_params["datasets"]["glyphs"]
    assert entry["source"] == "glyphs"
    prepare_dataset("glyphs", root / "glyphs", **{**entry["options"], "image_size": 8, "instances_per_font": 1})
    return root


def test_shipped_mh_mixes_datasets_that_would_leak(mh_data_root, shipped_params):
    leaking = copy.deepcopy(shipped_params)
    leaking["scenarios"]["mh"]["cross_dataset_leaks"] = "refuse"
    with pytest.raises(CrossDatasetLeakError, match=r"glyphs: 15 meta-train classes of family cyrillic \(cyrillic_Be"):
        member_pool_classes(member_settings(leaking, "mh", 0), mh_data_root)


@pytest.fixture(scope="module")
def cifarfs_data_root(mh_data_root):
    """mh_data_root plus data/cifarfs from the shared CIFAR-100 copy (skips when it is absent)."""
    prepare_dataset("cifarfs", mh_data_root / "cifarfs", root=shared_cifar100_root(), download=False)
    return mh_data_root


@pytest.mark.parametrize("name", ["mh", "cifarfs_mh"])
def test_shipped_mh_pool_is_leak_free(name, request, shipped_params):
    data_root = request.getfixturevalue("cifarfs_data_root" if "cifarfs" in name else "mh_data_root")
    scenario = shipped_params["scenarios"][name]
    assert scenario["cross_dataset_leaks"] == "exclude" and len(scenario["datasets"]) >= 2
    stores = {dataset: DatasetStore(data_root / dataset) for dataset in scenario["datasets"]}
    tested = {dataset: evaluated_families(store) for dataset, store in stores.items()}
    excluded_counts = Counter()
    for index in range(scenario["members_per_dataset"] * len(scenario["datasets"])):
        settings = member_settings(shipped_params, name, index)
        candidates, excluded = member_pool_classes(settings, data_root)
        spec = plan_member(settings, candidates)
        own = settings["dataset"]
        groups = stores[own].groups()
        others = set().union(*(tested[dataset] for dataset in stores if dataset != own))
        assert not {family_of(groups[c]) for c in candidates} & others, own
        assert len(spec.classes) == 5 and set(spec.classes) <= set(candidates)
        if settings["dataset_member"] == 0:
            excluded_counts.update((own, leak.family) for leak in excluded)
    # CIFAR-100 superclasses share no family with a script: adding CIFAR-FS excludes nothing more
    assert excluded_counts == {("glyphs", "cyrillic"): 15, ("omniglot", "latin"): 26, ("omniglot", "greek"): 24,
                               ("omniglot", "cyrillic"): 33}


def test_no_shipped_config_mixes_datasets_without_a_leak_policy():
    for path in [REPO_ROOT / "params.yaml", *sorted((REPO_ROOT / "configs").glob("*.yaml"))]:
        for name, scenario in (yaml.safe_load(path.read_text()).get("scenarios") or {}).items():
            if len(scenario.get("datasets", [])) > 1:
                assert scenario.get("cross_dataset_leaks") == "exclude", f"{path.name}: {name}"


# --- the pool summary ----------------------------------------------------------------------------------


def test_pool_summary_lists_the_excluded_classes(tmp_path):
    leaks = [{"dataset": "glyphs", "class": name, "group": "cyrillic", "family": "cyrillic",
              "tested_in": ["omniglot"], "reason": "family cyrillic is in the meta-test of omniglot"}
             for name in ("cyrillic_Be", "cyrillic_Che")]
    architecture = {"name": "conv4", "num_classes": 2, "in_channels": 1, "image_size": 28, "width": 2}
    for index, dataset in enumerate(["glyphs", "glyphs", "omniglot"]):
        spec = MemberSpec("mh", index, dataset, ("x", "y"), "conv4", architecture, seed=index)
        save_member(build_model(**architecture), spec, *member_paths(tmp_path / "mh", index), heldout_accuracy=0.5,
                    best_epoch=1, cross_dataset_leaks="exclude", excluded_classes=leaks if dataset == "glyphs" else [])
    csv_path, md_path = tmp_path / "summary.csv", tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, "scripts/pool_summary.py", str(tmp_path / "mh"), "--csv", str(csv_path),
                           "--markdown", str(md_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    markdown = md_path.read_text()
    assert "## Classes left out of the pool (cross-dataset concept leaks)" in markdown
    assert ("| glyphs | cyrillic | cyrillic | 2 | family cyrillic is in the meta-test of omniglot "
            "| cyrillic_Be cyrillic_Che |") in markdown
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["excluded_pool_classes"] for row in rows] == ["2", "2", "0"]
