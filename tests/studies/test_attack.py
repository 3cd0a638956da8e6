"""The attack study's report (dfml/studies/attack.py): families of scenarios, paired accuracy drops, how well member
weights separate honest from untrusted members, the summary.md section, figures and the report script."""

import json
import subprocess
import sys

import pytest
from scipy import stats

from conftest import REPO_ROOT
from dfml.studies.attack import (DAGGER, accuracy_against_fraction, attack_families, attack_markdown, family_separations,
                         read_members, separation, write_attack_report)
from dfml.evaluation.stats import mean_ci95
from dfml.report import method_colours

SS = {"datasets": ["glyphs"], "architectures": ["conv4"], "members_per_dataset": 6, "image_size": 28}


def untrusted(fraction: float) -> dict:
    return {**SS, "untrusted": {"fraction": fraction, "kinds": ["deceptive_label", "deceptive_accuracy"],
                                "source": "omniglot", "claimed_accuracy": 0.9}}


SCENARIOS = {"attack0": SS, "attack40": untrusted(0.4), "attack20": untrusted(0.2),
             "other": {**SS, "members_per_dataset": 3}, "other40": {**untrusted(0.4), "members_per_dataset": 3},
             "lonely": {**SS, "image_size": 32, "untrusted": {"fraction": 0.2}}}
FAMILIES = {"attack0": [("attack0", 0.0), ("attack20", 0.2), ("attack40", 0.4)]}


def test_families_group_scenarios_equal_apart_from_untrusted_and_need_a_clean_pool():
    families = attack_families(SCENARIOS)
    assert families == {"attack0": [("attack0", 0.0), ("attack20", 0.2), ("attack40", 0.4)],
                        "other": [("other", 0.0), ("other40", 0.4)]}  # lonely: no clean pool
    assert attack_families({"ss": SS, "sh": {**SS, "architectures": ["resnet10"]}}) == {}  # no untrusted: none
    assert attack_families({"a": untrusted(0.2), "b": untrusted(0.4)}) == {}  # no clean member
    zero = {**SS, "untrusted": {"fraction": 0}}  # fraction 0 is an honest pool too, and names the family
    assert attack_families({"z": zero, "a": untrusted(0.2)}) == {"z": [("z", 0.0), ("a", 0.2)]}
    with pytest.raises(ValueError, match="scenarios attack0, ss are the same pool at untrusted fraction 0"):
        attack_families({"ss": SS, "attack0": SS, "attack20": untrusted(0.2)})


def result(scenario, method, accuracies, shot=1, calibration="plain", fingerprint="abc", protocol="test1"):
    mean, ci = mean_ci95(accuracies)
    return {"scenario": scenario, "method": method, "protocol": protocol, "shot": shot, "calibration": calibration,
            "mean": mean, "ci95": ci, "accuracies": accuracies, "episodes": len(accuracies),
            "per_dataset": {"glyphs": {"episodes_sha256": fingerprint}}}


CLEAN = [0.60, 0.50, 0.70, 0.40, 0.80]
AT20 = [0.50, 0.50, 0.60, 0.40, 0.60]
AT40 = [0.30, 0.20, 0.40, 0.10, 0.50]  # 0.3 below the clean pool on every episode
RESULTS = [result("attack0", "purer", CLEAN), result("attack20", "purer", AT20), result("attack40", "purer", AT40),
           result("attack0", "taco_rw_pseudo", CLEAN), result("attack20", "taco_rw_pseudo", CLEAN),
           result("attack40", "taco_rw_pseudo", AT20)]


def test_paired_drop_equals_a_hand_computation_and_is_holm_adjusted_over_the_family():
    rows = accuracy_against_fraction(RESULTS, FAMILIES)
    by = {(r["method"], r["fraction"]): r for r in rows}
    assert by[("purer", 0.0)]["accuracy"] == 60.0 and by[("purer", 0.0)]["difference"] is None
    # attack20 - clean, episode by episode: -0.1, 0, -0.1, 0, -0.2 -> mean -0.08; s = sqrt(0.007) = 0.083666
    row = by[("purer", 0.2)]
    assert row["accuracy"] == 52.0 and row["difference"] == pytest.approx(-8.0)
    assert row["ci95"] == pytest.approx(100 * stats.t.ppf(0.975, 4) * 0.083666 / 5 ** 0.5, abs=1e-3)
    assert row["p_value"] == pytest.approx(stats.ttest_rel(AT20, CLEAN).pvalue, rel=1e-2)
    raw = [by[k]["p_value"] for k in [("purer", 0.2), ("purer", 0.4), ("taco_rw_pseudo", 0.2),
                                      ("taco_rw_pseudo", 0.4)]]
    assert raw[1] < 1e-12 and raw[2] == 1.0 and raw[3] == raw[0]  # a constant drop; no change; the same drop
    assert by[("purer", 0.4)]["significant"] and not by[("purer", 0.2)]["significant"]
    # Holm over the family's 4 differences, sorted 0, p, p, 1: 4 * 0, then max(3p, 2p) for both p
    assert [by[k]["p_holm"] for k in [("purer", 0.2), ("purer", 0.4), ("taco_rw_pseudo", 0.4)]] == \
        pytest.approx([3 * raw[0], 4 * raw[1], 3 * raw[0]], rel=1e-2)


def test_results_scored_on_other_episodes_are_refused_naming_the_scenarios():
    mismatched = RESULTS[:2] + [result("attack40", "purer", AT40, fingerprint="other")]
    with pytest.raises(ValueError, match=r"attack family attack0: purer 1-shot \(test1, plain\) was not scored on "
                                         r"the same meta-test episodes in attack0 and attack40"):
        accuracy_against_fraction(mismatched, FAMILIES)


def write_pool(root, scenario, kinds):
    """Pool cards: honest ones without `truth`, untrusted ones with it."""
    folder = root / scenario
    folder.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(kinds):
        card = {"index": i, "dataset": "glyphs"}
        if kind != "honest":
            card["truth"] = {"kind": kind, "trained_on": "omniglot", "true_classes": [0, 1, 2, 3, 4],
                             "true_heldout_accuracy": 0.2}
        (folder / f"member_{i}.json").write_text(json.dumps(card))


def write_members(root, scenario, method, probabilities, selection="reliability", data_free=True, shot=1):
    path = root / "metatrain" / scenario / method / "seed0" / f"shot{shot}" / "members.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    uniform = selection == "uniform"
    path.write_text(json.dumps({
        "method": method, "algorithm": "taco", "selection": selection, "reward": None if uniform else "pseudo",
        "data_free": data_free, "events": 31,
        "members": [{"index": i, "card": f"member_{i}.json", "draws": 3, "probability": p,
                     "logit": None if uniform else float(i)} for i, p in enumerate(probabilities)]}))
    return path


# 4 honest, 2 untrusted: three honest members outrank both untrusted ones, the fourth outranks none
KINDS = ["honest", "honest", "honest", "honest", "deceptive_label", "deceptive_accuracy"]
PROBABILITIES = [0.30, 0.25, 0.20, 0.02, 0.05, 0.03]


def test_auc_mean_probability_per_kind_and_most_down_weighted_by_hand(tmp_path):
    write_pool(tmp_path / "pool", "attack40", KINDS)
    path = write_members(tmp_path, "attack40", "taco_rw_pseudo", PROBABILITIES)
    run = separation(read_members(path, tmp_path / "pool"), k=3)
    assert run["auc"] == pytest.approx(6 / 8)  # 8 honest-untrusted pairs, 6 ordered right
    assert run["mean_probability"] == pytest.approx({"honest": 0.1925, "deceptive_label": 0.05,
                                                     "deceptive_accuracy": 0.03})
    assert run["most_down_weighted"] == [(3, "honest", 0.02), (5, "deceptive_accuracy", 0.03),
                                         (4, "deceptive_label", 0.05)]
    assert (run["scenario"], run["method"], run["shot"]) == ("attack40", "taco_rw_pseudo", 1)


def test_uniform_selection_has_no_auc(tmp_path):
    write_pool(tmp_path / "pool", "attack40", KINDS)
    path = write_members(tmp_path, "attack40", "taco", [1 / 6] * 6, selection="uniform")
    run = separation(read_members(path, tmp_path / "pool"))
    assert run["auc"] is None and run["auc_note"] == "uniform selection"


def test_a_missing_pool_card_is_named(tmp_path):
    write_pool(tmp_path / "pool", "attack40", KINDS[:2])
    path = write_members(tmp_path, "attack40", "taco_rw_pseudo", PROBABILITIES)
    with pytest.raises(FileNotFoundError, match=r"member 2 names the pool card .*attack40/member_2.json"):
        read_members(path, tmp_path / "pool")


def attack_study(tmp_path) -> list:
    """Pools and members.json of the attack0 family: a data-free weighted run, a weighted run on real
    meta-val episodes (data_free false) and a uniform one."""
    pools = tmp_path / "pool"
    write_pool(pools, "attack0", KINDS[:4])
    write_pool(pools, "attack20", KINDS[:5])
    write_pool(pools, "attack40", KINDS)
    paths = [write_members(tmp_path, "attack0", "taco_rw_pseudo", [0.25] * 4),
             write_members(tmp_path, "attack20", "taco_rw_pseudo", [0.3, 0.3, 0.2, 0.15, 0.05]),
             write_members(tmp_path, "attack40", "taco_rw_pseudo", PROBABILITIES),
             write_members(tmp_path, "attack40", "taco_rw_metaval", PROBABILITIES[::-1], data_free=False),
             write_members(tmp_path, "attack40", "taco", [1 / 6] * 6, selection="uniform")]
    return paths


def test_markdown_names_the_most_down_weighted_members_and_marks_methods_that_read_meta_val(tmp_path):
    paths = attack_study(tmp_path)
    results = RESULTS + [result(s, m, CLEAN) for s in ("attack0", "attack40") for m in ("taco_rw_metaval", "taco")]
    separations = family_separations(paths, tmp_path / "pool", FAMILIES)
    text = "\n".join(attack_markdown(FAMILIES, accuracy_against_fraction(results, FAMILIES), separations))
    assert "## Untrusted members" in text
    assert "### Family attack0: attack0 (0%), attack20 (20%), attack40 (40%)" in text
    assert "| purer | 1 | plain | 60.0 | 52.0 (-8.0 +- 10.4) | 30.0 (-30.0 +- 0.0)* |" in text
    assert "| taco_rw_pseudo | 1 | 1.000 | 0.750 |" in text  # 20%: the untrusted member is the lowest
    assert "| taco | 1 | n/a | uniform |" in text  # uniform: said so, not 0.5
    assert f"| taco_rw_metaval{DAGGER} | 1 | plain |" in text and f"| taco_rw_metaval{DAGGER} | 1 | n/a | " in text
    assert f"{DAGGER} read real meta-val episodes during training" in text
    assert ("- taco_rw_pseudo 1-shot, 40% (attack40): member_3 (honest, 0.0200), member_5 (deceptive_accuracy, "
            "0.0300), member_4 (deceptive_label, 0.0500), member_2 (honest, 0.2000)") in text
    assert "- taco 1-shot" not in text  # a uniform run down-weights no member
    assert "| taco_rw_pseudo | 1 | 40% | 0.1925 | 0.0500 | 0.0300 |" in text


def test_figures_and_csvs_are_written_only_for_a_family(tmp_path):
    paths = attack_study(tmp_path)
    plots = tmp_path / "plots"
    plots.mkdir()
    colours = method_colours(r["method"] for r in RESULTS)
    section = write_attack_report(RESULTS, paths, {**SCENARIOS, "ss": SS}, tmp_path / "pool", plots, colours)
    assert section[0] == "## Untrusted members"  # families only among scenarios with results: no "other", "ss"
    for name in ("attack_accuracy_attack0.png", "attack_weights_attack0.png", "attack_accuracy.csv",
                 "attack_weights.csv"):
        assert (plots / name).stat().st_size > 0, name
    assert not (plots / "attack_accuracy_other.png").exists()
    weights = (plots / "attack_weights.csv").read_text().splitlines()
    assert weights[0].startswith("family,scenario,fraction,method,shot,selection,reward,data_free,events,auc,")
    assert len(weights) == 1 + 5
    clean_only = tmp_path / "clean"
    clean_only.mkdir()
    assert write_attack_report(RESULTS, [], {"attack0": SS}, tmp_path / "pool", clean_only, colours) == []
    assert list(clean_only.iterdir()) == []


def test_report_script_adds_the_section_and_figures(tmp_path):
    paths = attack_study(tmp_path)
    files = []
    for r in RESULTS:
        path = tmp_path / "metatest" / r["scenario"] / r["method"] / "seed0" / "test1" / f"shot{r['shot']}_plain.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
        files.append(str(path))
    out = tmp_path / "results"
    def report(out, *attack):
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts/report.py"), "--results", *files, "--out", str(out),
                        "--metrics", str(out / "metrics.json"), *attack], check=True, capture_output=True, cwd=tmp_path)

    report(out, "--members", *map(str, paths), "--scenarios-json", json.dumps(SCENARIOS),
           "--pools-root", str(tmp_path / "pool"))
    summary = (out / "summary.md").read_text()
    assert "## Untrusted members" in summary and summary.index("## Untrusted members") < summary.index("Reproduce")
    for name in ("attack_accuracy_attack0.png", "attack_weights_attack0.png", "attack_accuracy.csv"):
        assert (out / "plots" / name).stat().st_size > 0, name
    plain = tmp_path / "plain"
    report(plain)
    assert "Untrusted" not in (plain / "summary.md").read_text()  # without the new arguments: as before
    assert not list((plain / "plots").glob("attack_*"))
