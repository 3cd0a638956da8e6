import json
import math

import pytest
from scipy import stats

from dfml.evaluate import mean_ci95, paired_difference
from dfml.report import comparisons, metrics, summary_markdown, write_report


def test_mean_and_ci_of_known_accuracies():
    mean, ci = mean_ci95([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert ci == pytest.approx(1.96 * 0.5 / 2)  # population std 0.5, n = 4
    assert mean_ci95([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="no accuracies"):
        mean_ci95([])


def test_paired_difference_matches_a_paired_t_test():
    a = [0.6, 0.7, 0.5, 0.9, 0.8, 0.4]
    b = [0.5, 0.6, 0.5, 0.7, 0.6, 0.5]
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 6)
    assert diff.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert diff.n == 6
    same = paired_difference(a, a)
    assert same.mean == 0 and same.ci95 == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="same episodes: 2 vs 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def result(method, accuracies, calibration="plain", shot=1, scenario="ss", fingerprint="abc"):
    mean, ci = mean_ci95(accuracies)
    return {"scenario": scenario, "method": method, "shot": shot, "calibration": calibration, "mean": mean,
            "ci95": ci, "accuracies": accuracies, "episodes": len(accuracies),
            "per_dataset": {"d": {"episodes_sha256": fingerprint}}}


RESULTS = [
    result("purer", [0.6, 0.7, 0.8, 0.7]),
    result("average", [0.4, 0.5, 0.6, 0.5]),
    result("purer", [0.7, 0.8, 0.8, 0.8], calibration="icfil"),
]


def test_metrics_tree_is_in_percent():
    tree = metrics(RESULTS)
    assert tree["ss"]["purer"]["1shot"]["plain"]["accuracy"] == 70.0
    assert tree["ss"]["average"]["1shot"]["plain"]["episodes"] == 4


def test_comparisons_are_paired_against_purer_and_icfil_against_plain():
    rows = {(r["a"], r["b"]): r for r in comparisons(RESULTS)}
    assert rows[("purer", "average")]["difference"] == pytest.approx(20.0)
    assert rows[("purer", "average")]["ci95"] == 0.0 and rows[("purer", "average")]["significant"]
    assert rows[("purer+icfil", "purer")]["difference"] == pytest.approx(7.5)


def test_icfil_is_also_compared_with_the_matched_steps_control():
    with_control = [*RESULTS, result("purer", [0.7, 0.9, 0.8, 0.9], calibration="steps")]
    rows = {(r["a"], r["b"]): r for r in comparisons(with_control)}
    control = rows[("purer+icfil", "purer+steps")]
    assert control["calibration"] == "icfil vs steps" and control["difference"] == pytest.approx(-5.0)
    assert ("purer", "purer") not in rows  # the control is not compared with purer's other calibrations
    assert ("purer+icfil", "purer+steps") not in {(r["a"], r["b"]) for r in comparisons(RESULTS)}


def test_comparing_different_episodes_is_refused():
    results = [result("purer", [0.5, 0.6]), result("random", [0.2, 0.3], fingerprint="other")]
    with pytest.raises(ValueError, match="not scored on the same episodes"):
        comparisons(results)


def test_summary_lists_every_method_and_reproduce_command():
    text = summary_markdown(RESULTS, comparisons(RESULTS), "make run")
    assert "| purer | 70.00 +- " in text and "| average | 50.00 +- " in text
    assert "n/a" in text  # average has no ICFIL result here
    assert "Reproduce: `make run`" in text


def test_write_report_writes_metrics_csvs_and_figures(tmp_path):
    curves = {"ss/purer/1shot": [(0, 30.0), (10, 40.0)], "ss/purer_ei/1shot": [(0, 30.0), (10, 35.0)]}
    write_report(RESULTS, curves, tmp_path, tmp_path / "metrics.json", "make run")
    assert json.loads((tmp_path / "metrics.json").read_text())["ss"]["purer"]["1shot"]["icfil"]["accuracy"] == 77.5
    curve_csv = (tmp_path / "plots" / "metaval_curves.csv").read_text().splitlines()
    assert curve_csv[0] == "iteration,ss/purer/1shot,ss/purer_ei/1shot" and curve_csv[2] == "10,40.0,35.0"
    for name in ("accuracy.png", "metaval_curves.png", "accuracy.csv", "comparisons.csv"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    assert math.isclose(float((tmp_path / "plots" / "accuracy.csv").read_text().splitlines()[1].split(",")[-2]), 50.0)
