"""Untrusted pool members (dfml/untrusted.py, METHODS.md 4.2): TACO's count, nested pools across fractions, the
two kinds of lie built on real data, the truth hidden from methods, the summary, and the config errors."""

import copy
import csv
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO_ROOT, copy_project, run_snakemake, shared_omniglot_root
from dfml.config import ParamsError, check_params, untrusted_kinds
from dfml.data import DatasetStore
from dfml.data.families import family_of
from dfml.data.sources import prepare_dataset
from dfml.leakage import evaluated_families, source_pool_classes
from dfml.models import build_model
from dfml.pool import MemberSpec, load_pool, member_paths, member_settings, read_truth
from dfml.pretrain import accuracy, member_tensors
from dfml.untrusted import KINDS, pool_size, untrusted_count

BASE = {"datasets": ["glyphs"], "architectures": ["conv4", "r10"], "members_per_dataset": 6, "image_size": 16,
        "classes_per_member": 3}
PARAMS = {
    "seed": 5,
    "run_scenarios": ["u40"],
    "datasets": {"glyphs": {"source": "glyphs"}, "omniglot": {"source": "omniglot"}, "marks": {"source": "glyphs"}},
    "models": {"conv4": {"arch": "conv4", "width": 4}, "r10": {"arch": "resnet10", "width": 2}},
    "scenarios": {
        "base": BASE,
        **{f"u{round(f * 100)}": {**BASE, "untrusted": {"fraction": f, "source": "omniglot"}} for f in (0.2, 0.4, 0.8)},
        "mixed": {"datasets": ["glyphs", "marks"], "architectures": ["conv4"], "members_per_dataset": 2,
                  "cross_dataset_leaks": "exclude",
                  "untrusted": {"fraction": 0.8, "source": "omniglot",
                                "kinds": ["deceptive_accuracy", "deceptive_label", "deceptive_accuracy"]}},
    },
    "pretrain": {"epochs": 1, "batch_size": 16},
}


@pytest.fixture(scope="module")
def params():
    return check_params(PARAMS)


def without_scenario(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key != "scenario"}


# --- counting and planning -------------------------------------------------------------------------------


@pytest.mark.parametrize("honest, fraction, untrusted", [
    (6, 0, 0), (6, 0.2, 2), (6, 0.4, 4), (6, 0.8, 24),
    (100, 0.05, 6), (100, 0.1, 12), (100, 0.2, 25), (100, 0.4, 67), (100, 0.8, 400),  # TACO's 106 ... 500
    (3, 0.25, 1), (1, 0.5, 1), (7, 0.3, 3),
])
def test_untrusted_members_make_up_the_fraction_of_the_final_pool(honest, fraction, untrusted):
    assert untrusted_count(honest, fraction) == untrusted
    assert untrusted / (honest + untrusted) >= fraction  # ceil: at least the fraction, by less than one member
    assert (untrusted - 1) / (honest + untrusted - 1) < fraction or untrusted == 0


def test_the_pool_has_the_untrusted_members_after_the_honest_ones(params):
    scenarios = params["scenarios"]
    assert [pool_size(scenarios[name]) for name in ("base", "u20", "u40", "u80")] == [6, 8, 10, 30]
    assert "untrusted" not in scenarios["base"]  # the key has no default: scenarios without it stay as they were
    assert [("untrusted" in member_settings(params, "u40", i)) for i in range(10)] == [False] * 6 + [True] * 4
    with pytest.raises(ValueError, match="scenario u40 has members 0..9, got 10"):
        member_settings(params, "u40", 10)


def test_kinds_and_claimed_datasets_cycle_and_architectures_cycle_over_all_members(params):
    honest = 4  # mixed: 2 datasets x 2 members, fraction 0.8 -> 16 untrusted
    untrusted = [member_settings(params, "mixed", honest + j) for j in range(16)]
    kinds = ["deceptive_accuracy", "deceptive_label", "deceptive_accuracy"]
    assert [s["untrusted"]["kind"] for s in untrusted] == [kinds[j % 3] for j in range(16)]
    assert [s["dataset"] for s in untrusted] == [["glyphs", "marks"][j % 2] for j in range(16)]
    assert all(s["untrusted"].get("source") == ("omniglot" if s["untrusted"]["kind"] == "deceptive_label" else None)
               for s in untrusted)
    archs = [member_settings(params, "u40", i)["model"] for i in range(10)]
    assert archs == ["conv4", "r10"] * 5


def test_pools_at_growing_fractions_are_nested(params):
    for index in range(6, 8):
        smallest = without_scenario(member_settings(params, "u20", index))
        assert smallest == without_scenario(member_settings(params, "u40", index))
        assert smallest == without_scenario(member_settings(params, "u80", index))
    for index in range(6, 10):
        assert without_scenario(member_settings(params, "u40", index)) == \
            without_scenario(member_settings(params, "u80", index))
    assert member_settings(params, "u40", 6) != member_settings(params, "u40", 8)  # members differ by their seed


def test_honest_members_are_those_of_the_scenario_without_untrusted_members(params):
    for index in range(6):
        base = member_settings(params, "base", index)
        assert set(base) == {"scenario", "index", "dataset", "scenario_datasets", "cross_dataset_leaks",
                             "dataset_member", "classes_per_member", "class_assignment", "model", "arch", "width",
                             "image_size", "channels", "seed", "pretrain"}
        for name in ("u20", "u40", "u80"):
            assert without_scenario(member_settings(params, name, index)) == without_scenario(base)


def test_only_a_trained_kind_depends_on_the_training_settings(params):
    changed = copy.deepcopy(params)
    changed["pretrain"]["epochs"] = 7
    changed["scenarios"]["u40"]["untrusted"]["claimed_accuracy"] = 0.5
    assert member_settings(changed, "u40", 6) != member_settings(params, "u40", 6)  # deceptive_label: trained
    assert member_settings(changed, "u40", 7)["pretrain"] == member_settings(params, "u40", 7)["pretrain"]
    assert member_settings(changed, "u40", 7)["untrusted"] == {"kind": "deceptive_accuracy", "claimed_accuracy": 0.5}


def test_the_code_knows_the_kinds_the_schema_allows():
    assert list(KINDS) == untrusted_kinds()


# --- built on real data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Real glyphs and Omniglot stores, tiny images (the scenario resizes them to 16 px)."""
    root = tmp_path_factory.mktemp("data")
    prepare_dataset("omniglot", root / "omniglot", root=shared_omniglot_root(), image_size=8, download=False)
    prepare_dataset("glyphs", root / "glyphs", image_size=8, seed=0, instances_per_font=1)
    return root


@pytest.fixture(scope="module")
def pool(data_root, params, tmp_path_factory):
    """Members 0 (honest), 6 (deceptive_label) and 7 (deceptive_accuracy) of u40, built by the pretrain script."""
    out = tmp_path_factory.mktemp("pool")
    for index in (0, 6, 7):
        proc = subprocess.run([sys.executable, "scripts/pretrain_member.py", "--scenario", "u40", "--member",
                               str(index), "--settings-json", json.dumps(member_settings(params, "u40", index)),
                               "--data-root", str(data_root), "--out", str(out), "--threads", "1", "--no-progress"],
                              cwd=REPO_ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return out / "u40"


def card_of(pool_dir, index) -> dict:
    return json.loads(member_paths(pool_dir, index)[1].read_text())


def test_cards_claim_in_domain_classes(pool, data_root):
    glyphs = DatasetStore(data_root / "glyphs")
    for index in (6, 7):
        card = card_of(pool, index)
        assert card["dataset"] == "glyphs" and len(card["classes"]) == 3
        assert set(card["classes"]) <= set(glyphs.classes("meta_train"))
        assert card["class_indices"] == [glyphs.classes("meta_train").index(c) for c in card["classes"]]
        assert card["normalization"] == {"mean": list(glyphs.info.mean), "std": list(glyphs.info.std)}
    assert card_of(pool, 6)["classes"] != card_of(pool, 7)["classes"]
    assert "truth" not in card_of(pool, 0)


def test_a_deceptive_label_member_is_trained_on_leak_free_source_classes(pool, data_root, params):
    card, omniglot = card_of(pool, 6), DatasetStore(data_root / "omniglot")
    truth = card["truth"]
    assert (truth["kind"], truth["trained_on"]) == ("deceptive_label", "omniglot")
    assert len(truth["true_classes"]) == 3 and set(truth["true_classes"]) <= set(omniglot.classes("meta_train"))
    tested = evaluated_families(DatasetStore(data_root / "glyphs"))
    groups = omniglot.groups()
    assert not {family_of(groups[c]) for c in truth["true_classes"]} & tested
    # the candidates leave out every Omniglot alphabet of a script the glyph meta-test holds, and only those
    candidates, left_out = source_pool_classes(member_settings(params, "u40", 6), data_root)
    assert {leak.family for leak in left_out} == {"latin", "greek", "cyrillic"} <= tested
    assert all(family_of(groups[c]) not in tested for c in candidates)
    assert len(candidates) + len(left_out) == len(omniglot.classes("meta_train"))
    # the card claims the accuracy the model really has on its source's held-out images
    member = load_pool(pool)[1]
    truly = MemberSpec("u40", 6, "omniglot", tuple(truth["true_classes"]), card["model"], card["architecture"], 0)
    _, _, held_x, held_y = member_tensors(omniglot, truly, params["pretrain"]["heldout_fraction"])
    assert accuracy(member.model, held_x, held_y) == pytest.approx(truth["true_heldout_accuracy"], abs=1e-6)
    assert card["heldout_accuracy"] == truth["true_heldout_accuracy"] and card["best_epoch"] == 1


def test_a_deceptive_accuracy_member_is_an_untrained_seeded_init(pool, data_root, params):
    card = card_of(pool, 7)
    settings = member_settings(params, "u40", 7)
    torch.manual_seed(settings["seed"])
    fresh = build_model(**card["architecture"]).state_dict()
    member = load_pool(pool)[2]
    assert member.card["architecture"]["name"] == "resnet10" and member.card["index"] == 7
    for key, value in member.model.state_dict().items():
        assert torch.equal(value, fresh[key]), key
    truth = card["truth"]
    assert truth["kind"] == "deceptive_accuracy" and truth["trained_on"] is None and truth["true_classes"] is None
    assert card["heldout_accuracy"] == 0.95 and truth["true_heldout_accuracy"] < 0.7  # 3 classes: chance is 1/3
    spec = MemberSpec("u40", 7, "glyphs", tuple(card["classes"]), card["model"], card["architecture"], 0)
    _, _, held_x, held_y = member_tensors(DatasetStore(data_root / "glyphs"), spec, 0.2)
    assert accuracy(member.model, held_x, held_y) == pytest.approx(truth["true_heldout_accuracy"], abs=1e-6)


def test_methods_never_see_the_truth(pool, tmp_path):
    members = load_pool(pool)
    assert [m.card["index"] for m in members] == [0, 6, 7]
    assert all("truth" not in m.card for m in members)
    assert read_truth(member_paths(pool, 0)[1]) is None
    assert read_truth(member_paths(pool, 7)[1])["kind"] == "deceptive_accuracy"
    # the checksum covers the weights only: a rewritten truth changes nothing methods load
    edited = tmp_path / "u40"
    edited.mkdir()
    for path in pool.iterdir():
        (edited / path.name).write_bytes(path.read_bytes())
    card_path = member_paths(edited, 6)[1]
    card = json.loads(card_path.read_text())
    card["truth"] = {"kind": "honest after all", "trained_on": None, "true_classes": None, "true_heldout_accuracy": 1}
    card_path.write_text(json.dumps(card))
    again = load_pool(edited)
    assert read_truth(card_path)["kind"] == "honest after all"
    x = torch.randn(4, 1, 16, 16)
    for before, after in zip(members, again):
        assert before.card == after.card
        assert torch.equal(before.model(x), after.model(x))


def test_the_pool_summary_shows_the_truth_next_to_the_claim(pool, tmp_path):
    csv_path, md_path = tmp_path / "summary.csv", tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, "scripts/pool_summary.py", str(pool), "--csv", str(csv_path),
                           "--markdown", str(md_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["truth"] for row in rows] == ["honest", "deceptive_label", "deceptive_accuracy"]
    assert list(rows[0])[5:8] == ["heldout_accuracy", "truth", "true_heldout_accuracy"]
    assert rows[2]["heldout_accuracy"] == "0.95"
    assert float(rows[2]["true_heldout_accuracy"]) == card_of(pool, 7)["truth"]["true_heldout_accuracy"]
    assert rows[0]["true_heldout_accuracy"] == rows[0]["heldout_accuracy"]
    assert "3 members, mean held-out accuracy" in md_path.read_text() and "2 of them untrusted" in md_path.read_text()


# --- config errors ---------------------------------------------------------------------------------------


def with_untrusted(**untrusted) -> dict:
    bad = copy.deepcopy(PARAMS)
    bad["scenarios"]["u40"]["untrusted"] = untrusted
    return bad


@pytest.mark.parametrize("untrusted, message", [
    ({"fraction": 1.0, "source": "omniglot"}, r"scenarios\.u40\.untrusted\.fraction: 1\.0 is outside \[0, 1\)"),
    ({"fraction": -0.1, "source": "omniglot"}, r"scenarios\.u40\.untrusted\.fraction: -0\.1 is outside \[0, 1\)"),
    ({"fraction": 0.2, "kinds": ["deceptive_label", "backdoor"], "source": "omniglot"},
     r"scenarios\.u40\.untrusted\.kinds: unknown kind 'backdoor'; known kinds: \['deceptive_label', "
     r"'deceptive_accuracy'\]"),
    ({"fraction": 0.2, "kinds": []}, r"scenarios\.u40\.untrusted\.kinds is empty"),
    ({"fraction": 0.2}, r"scenarios\.u40\.untrusted\.source is missing: deceptive_label members are trained on "
                        r"another dataset's classes; name a configured dataset that is not one of the scenario's "
                        r"\(\['marks', 'omniglot'\]\)"),
    ({"fraction": 0.2, "source": "mnist"},
     r"scenarios\.u40\.untrusted\.source: unknown dataset 'mnist'; defined datasets: \['glyphs', 'marks', 'omniglot'\]"),
    ({"fraction": 0.2, "source": "glyphs"},
     r"scenarios\.u40\.untrusted\.source: 'glyphs' is one of the scenario's datasets"),
])
def test_a_bad_untrusted_setting_is_refused_naming_the_key(untrusted, message):
    with pytest.raises(ParamsError, match=message):
        check_params(with_untrusted(**untrusted))


def test_deceptive_accuracy_alone_needs_no_source(params):
    checked = check_params(with_untrusted(fraction=0.2, kinds=["deceptive_accuracy"]))
    assert checked["scenarios"]["u40"]["untrusted"] == {"fraction": 0.2, "kinds": ["deceptive_accuracy"],
                                                        "claimed_accuracy": 0.95}


# --- the workflow ----------------------------------------------------------------------------------------


@pytest.mark.workflow
def test_the_workflow_plans_every_member_with_the_source_store_where_it_is_trained_on(tmp_path):
    params = copy.deepcopy(PARAMS)
    params["datasets"]["omniglot"]["options"] = {"root": "/nonexistent"}  # a dry run reads no data
    project = copy_project(tmp_path, params)
    output = run_snakemake(project, "-n", "pool").stdout
    jobs = re.findall(r"rule pretrain_model:\n\s+input: ([^\n]*)\n\s+output: results/pool/u40/member_(\d+)\.", output)
    inputs = {int(member): line for line, member in jobs}
    assert sorted(inputs) == list(range(10))
    assert [("data/omniglot/splits.json" in inputs[i]) for i in range(10)] == [False] * 6 + [True, False] * 2
    assert len(re.findall(r"rule prepare_dataset:", output)) == 2  # glyphs, and omniglot for the deceptive_label
