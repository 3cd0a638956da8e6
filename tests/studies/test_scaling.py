"""The scaling study's analysis (dfml/studies/scaling.py) on tiny hand-made results: the fit against a
reference computation, the bootstrap, the selection, the official rule's inflation, the verdict, bad input;
and scripts/scaling.py's two steps end to end on result files shaped like scripts/metatest.py's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from dfml.studies.scaling import (Arm, analyse, fit, fit_line, icfil_against_plain, load_arms,
                                  official_rule_inflation, resampled_means, select, verdict)

SETTINGS = {"paper": {"shot5": 50.0}, "extrapolate_to": 60000, "fit_last": 3, "bootstrap": 500, "bootstrap_seed": 0}


def result(accuracies) -> dict:
    accuracies = [float(a) for a in accuracies]
    return {"mean": float(np.mean(accuracies)), "ci95": 0.01, "accuracies": accuracies}


def make_arm(test: dict[int, list[float]], val: dict[int, float], method: str = "purer") -> Arm:
    arm = Arm("cifarfs_ss", method, "seed0", 5)
    for iteration, accuracies in test.items():
        arm.results[(iteration, "test1", "meta_test", "plain")] = result(accuracies)
        arm.results[(iteration, "test1", "meta_val", "plain")] = result([val[iteration]] * 4)
    return arm


def test_the_line_fit_matches_numpy_polyfit_for_one_and_many_curves():
    x = np.log2([100.0, 200, 400, 800])
    curves = np.array([[30.0, 33, 35, 38], [40, 39, 41, 40]])
    slope, intercept = fit_line(x, curves)
    for row, s, b in zip(curves, slope, intercept):
        ref_s, ref_b = np.polyfit(x, row, 1)
        assert s == pytest.approx(ref_s) and b == pytest.approx(ref_b)


def test_a_resample_draws_the_same_episodes_for_every_kept_model():
    accuracies = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])  # complementary: every draw sums to 1
    means = resampled_means(accuracies, 50, seed=3)
    assert means.shape == (50, 2) and np.allclose(means.sum(axis=1), 1.0)
    assert np.array_equal(means, resampled_means(accuracies, 50, seed=3))


def test_the_fit_over_the_last_kept_models_predicts_the_extrapolated_line_with_an_interval():
    rng = np.random.default_rng(0)
    # accuracy grows 2 points per doubling: episode i is right at iteration n with a fixed per-episode noise
    test = {n: (rng.random(200) < 0.3 + 0.02 * k).astype(float) for k, n in enumerate([100, 200, 400, 800, 1600])}
    arm = make_arm(test, {n: 0.5 for n in test})
    result_ = fit(arm, "test1", SETTINGS, last=3)
    assert result_["iterations"] == [400, 800, 1600]
    means = 100 * np.array([test[n].mean() for n in (400, 800, 1600)])
    ref_slope, ref_intercept = np.polyfit(np.log2([400, 800, 1600]), means, 1)
    assert result_["slope_per_doubling"] == pytest.approx(ref_slope)
    assert result_["predicted"] == pytest.approx(ref_intercept + ref_slope * np.log2(60000))
    low, high = result_["predicted_ci"]
    assert low < result_["predicted"] < high and result_["slope_ci"][0] < ref_slope < result_["slope_ci"][1]
    with pytest.raises(ValueError, match="1 kept model"):
        fit(make_arm({100: [1.0, 0.0]}, {100: 0.5}), "test1", SETTINGS)


def test_the_verdict_follows_the_preregistered_rule():
    assert verdict([52.0, 55.0], 51.95) == "more compute closes it"
    assert verdict([51.95, 55.0], 51.95) == "more compute closes it"
    assert verdict([40.0, 51.9], 51.95) == "a ceiling below the paper"
    assert verdict([50.0, 53.0], 51.95) == "cannot tell"
    assert verdict([50.0, 53.0], None) is None


def test_meta_val_selects_the_earliest_best_and_the_official_rule_takes_the_maximum_on_meta_test():
    test = {100: [0, 0, 1, 1], 200: [1, 1, 1, 0], 400: [1, 0, 1, 0]}
    arm = make_arm(test, {100: 0.4, 200: 0.6, 400: 0.6})
    assert select(arm) == {"test1": {"iteration": 200, "meta_val": 0.6}}
    rule = official_rule_inflation(arm, "test1", 400, SETTINGS)
    assert rule["max_iteration"] == 200 and rule["max"] == 75.0 and rule["selected"] == 50.0
    assert rule["inflation"] == 25.0 and 0.0 <= rule["inflation_ci"][0] <= rule["inflation_ci"][1]


def test_results_are_placed_by_their_path_and_a_stray_file_is_named(tmp_path):
    path = tmp_path / "cifarfs_ss" / "purer" / "seed0" / "shot5" / "iter100" / "test1" / "meta_test_plain.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result([1, 0])))
    (arm,) = load_arms([path])
    assert (arm.method, arm.run, arm.shot, arm.iterations("test1")) == ("purer", "seed0", 5, [100])
    stray = tmp_path / "notes.json"
    stray.write_text("{}")
    with pytest.raises(ValueError, match="notes.json: not a scaling result"):
        load_arms([stray])


def write_arm(root, method: str, shot: int, curve: dict[int, float], seed: int) -> list:
    """Result files of an arm whose meta-test accuracy at iteration n is about ``curve[n]`` (80 episodes)."""
    rng = np.random.default_rng(seed)
    files = []
    for iteration, level in curve.items():
        for protocol in ("test1", "test10"):
            for split, n in (("meta_test", 80), ("meta_val", 40)):
                path = (root / "cifarfs_ss" / method / "seed0" / f"shot{shot}" / f"iter{iteration}" / protocol
                        / f"{split}_plain.json")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result(np.clip(level + 0.1 * rng.standard_normal(n), 0, 1))))
                files.append(path)
    return files


def test_the_scripts_select_and_report_write_the_selection_the_numbers_the_report_and_the_figure(tmp_path):
    curve = {100: 0.30, 200: 0.33, 400: 0.36, 800: 0.38}
    purer = write_arm(tmp_path, "purer", 5, curve, seed=1)
    purer_ei = write_arm(tmp_path, "purer_ei", 5, {n: v - 0.02 for n, v in curve.items()}, seed=2)
    selection = tmp_path / "selection.json"
    run = [sys.executable, str(REPO_ROOT / "scripts" / "scaling.py")]
    subprocess.run([*run, "select", "--results", *map(str, purer), "--out", str(selection)], check=True,
                   cwd=REPO_ROOT, capture_output=True)
    assert set(json.loads(selection.read_text())["selected"]) == {"test1", "test10"}
    mixed = subprocess.run([*run, "select", "--results", *map(str, purer + purer_ei), "--out", str(selection)],
                           cwd=REPO_ROOT, capture_output=True, text=True)
    assert mixed.returncode != 0 and "select takes one arm's results, got 2 arms" in mixed.stderr
    out = tmp_path / "report"
    subprocess.run([*run, "report", "--plain", *map(str, purer + purer_ei), "--settings-json",
                    json.dumps({**SETTINGS, "fit_last": 4}), "--out-dir", str(out)], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    numbers = json.loads((out / "scaling.json").read_text())
    assert [a["method"] for a in numbers["arms"]] == ["purer", "purer_ei"]
    fitted = numbers["arms"][0]["protocols"]["test1"]["fit"]
    assert fitted["iterations"] == [100, 200, 400, 800] and fitted["verdict"] in (
        "more compute closes it", "a ceiling below the paper", "cannot tell")
    assert {row["at"] for row in numbers["comparisons"]} == {"last", "selected"}
    text = (out / "report.md").read_text()
    assert "purer, 5-shot, test1" in text and "inflation" in text and "purer - purer_ei" in text
    assert (out / "scaling.png").stat().st_size > 10_000


def test_analyse_keeps_icfil_beside_plain_for_the_kept_models_it_scored():
    arm = make_arm({100: [1, 0, 1, 0], 200: [1, 1, 1, 0]}, {100: 0.5, 200: 0.7})
    calibrated = Arm("cifarfs_ss", "purer", "seed0", 5)
    calibrated.results[(200, "test1", "meta_test", "icfil")] = result([1, 1, 1, 1])
    numbers = analyse([arm], [calibrated], {**SETTINGS, "fit_last": 2})
    scores = numbers["arms"][0]["icfil"]["test1"]
    assert list(scores) == ["200"]
    assert scores["200"]["icfil"] == 100.0 and scores["200"]["plain"] == 75.0 and scores["200"]["icfil_ci95"] == 1.0
    # paired over the same episodes: only the fourth episode differs (1 against 0), so every resample is 0 or +25 each
    paired = scores["200"]["icfil_minus_plain"]
    assert paired["difference"] == 25.0
    assert 0.0 <= paired["ci"][0] <= paired["ci"][1] <= 100.0 and paired["ci"][1] > paired["ci"][0]


def test_icfil_against_plain_pairs_the_episodes_and_refuses_a_kept_model_plain_did_not_score():
    arm = make_arm({100: [1, 0, 1, 0], 200: [0, 1, 0, 1]}, {100: 0.5, 200: 0.5})
    calibrated = Arm("cifarfs_ss", "purer", "seed0", 5)
    calibrated.results[(200, "test1", "meta_test", "icfil")] = result([1, 1, 0, 1])
    paired = icfil_against_plain(calibrated, arm, 200, "test1", {**SETTINGS})["icfil_minus_plain"]
    assert paired["difference"] == 25.0  # episode-wise [1, 0, 0, 0]
    calibrated.results[(400, "test1", "meta_test", "icfil")] = result([1, 1, 1, 1])
    with pytest.raises(ValueError, match="iteration 400, plain adaptation did not"):
        icfil_against_plain(calibrated, arm, 400, "test1", {**SETTINGS})
