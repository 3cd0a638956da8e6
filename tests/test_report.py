"""The report (dfml/report.py): paired comparisons (pre-registered pairs, Holm over the run's family), the metrics
tree, summary.md, one colour per method in every figure, accuracy against meta-training time, costs, the
leaderboard and the benchmark table."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import stats

from dfml.evaluation.stats import holm_adjust, mean_ci95, paired_difference
from dfml.report import comparisons, metrics, summary_markdown, write_report


def sample_with_t(t: float, n: int, seed: int = 0) -> np.ndarray:
    """n values whose one-sample t statistic (mean / (s / sqrt(n)), s with ddof = 1) is t."""
    base = np.random.default_rng(seed).normal(size=n)
    base = (base - base.mean()) / base.std(ddof=1)
    return base + t / math.sqrt(n)


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


def test_pre_registered_pairs_replace_purer_vs_all_and_holm_counts_only_them():
    results = [*RESULTS, result("purer_ei", [0.5, 0.7, 0.6, 0.7]), result("purer_sep", [0.6, 0.8, 0.7, 0.6])]
    default = {(r["a"], r["b"]) for r in comparisons(results)}
    assert default == {("purer", "purer_ei"), ("purer", "average"), ("purer", "purer_sep"), ("purer+icfil", "purer")}
    rows = comparisons(results, pairs=[["purer_sep", "purer_ei"], ["purer", "average"], ["purer", "ota"]])
    assert [(r["a"], r["b"]) for r in rows] == [("purer_sep", "purer_ei"), ("purer", "average"), ("purer+icfil", "purer")]
    sep = rows[0]  # differences 0.1, 0.1, 0.1, -0.1 -> mean 5 points
    assert sep["difference"] == pytest.approx(5.0) and sep["calibration"] == "plain"
    raw = [r["p_value"] for r in rows]
    assert [r["p_holm"] for r in rows] == pytest.approx(holm_adjust(raw), rel=1e-2)


def test_comparisons_must_name_methods_of_the_run(tmp_path):
    from dfml.config import ParamsError, check_comparisons

    params = {"methods": {"purer": {}, "purer_ei": {}}, "metatest": {"baselines": ["random", "ota"]},
              "report": {"comparisons": [["purer", "ota"], ["purer", "purer_sep"]]}}
    with pytest.raises(ParamsError, match=r"report.comparisons\[1\] = \['purer', 'purer_sep'\].*unknown: \['purer_sep'\]"):
        check_comparisons(params)
    params["report"]["comparisons"] = [["purer", "purer"]]
    with pytest.raises(ParamsError, match="two different methods"):
        check_comparisons(params)


def test_summary_columns_are_plain_icfil_steps_within_each_shot():
    results = [result("purer", [0.5], calibration=c, shot=k) for k in (5, 1) for c in ("steps", "icfil", "plain")]
    header = next(line for line in summary_markdown(results, [], "make run").splitlines() if line.startswith("| method"))
    assert header == ("| method | 1-shot plain | 1-shot icfil | 1-shot steps | 5-shot plain | 5-shot icfil | "
                      "5-shot steps |")


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


def shifted(base: np.ndarray, t: float, seed: int) -> list[float]:
    """base minus a difference with paired t statistic t (so base - result has t-test statistic t)."""
    return list(base - 0.01 * sample_with_t(t, len(base), seed))


def test_significance_is_holm_corrected_over_all_comparisons_of_the_run(tmp_path):
    n = 20
    base = np.linspace(0.5, 0.8, n)
    results = [result("purer", list(base)),
               result("average", shifted(base, stats.t.isf(0.03 / 2, n - 1), seed=1)),  # raw p = 0.03
               result("random", shifted(base, stats.t.isf(0.2 / 2, n - 1), seed=2)),
               result("purer_ei", shifted(base, stats.t.isf(0.6 / 2, n - 1), seed=3))]
    rows = {(r["a"], r["b"]): r for r in comparisons(results)}
    average = rows[("purer", "average")]
    assert average["p_value"] == pytest.approx(0.03)
    assert not average["significant"]  # not significant after Holm over the 3 comparisons of the run ...
    assert average["ci_excludes_0"]  # ... though uncorrected, the CI excludes 0 (p < 0.05)
    assert average["p_holm"] == pytest.approx(3 * 0.03)
    assert rows[("purer", "random")]["p_holm"] == pytest.approx(min(1, max(3 * 0.03, 2 * 0.2)))
    assert rows[("purer", "purer_ei")]["p_holm"] == pytest.approx(max(0.4, 0.6))
    strong = [*results[:1], result("average", shifted(base, stats.t.isf(1e-6 / 2, n - 1), seed=1)), *results[2:]]
    assert {(r["a"], r["b"]): r for r in comparisons(strong)}[("purer", "average")]["significant"]

    write_report(results, {}, tmp_path, tmp_path / "metrics.json", "make run")
    summary = (tmp_path / "summary.md").read_text()
    assert "Holm-corrected over the family of all 3 paired comparisons of this run" in summary
    assert "| p | p (Holm) | significant (Holm) |" in summary
    assert "| ss | 1 | plain | purer | average | " in summary and " | 0.03 | 0.09 | no |" in summary
    with open(tmp_path / "plots" / "comparisons.csv") as handle:
        table = {(r["a"], r["b"]): r for r in csv.DictReader(handle)}
    assert float(table[("purer", "average")]["p_value"]) == pytest.approx(0.03)
    assert float(table[("purer", "average")]["p_holm"]) == pytest.approx(0.09)
    assert table[("purer", "average")]["significant"] == "False"


def test_one_episode_gives_an_unbounded_ci_and_a_valid_report(tmp_path):
    results = [result("purer", [0.6]), result("average", [0.4])]
    write_report(results, {}, tmp_path, tmp_path / "metrics.json", "make run")
    assert json.loads((tmp_path / "metrics.json").read_text())["ss"]["purer"]["1shot"]["plain"]["ci95"] is None
    row = comparisons(results)[0]
    assert row["ci95"] == math.inf and row["p_value"] == 1.0 and not row["significant"]
    assert "60.00 +- inf" in (tmp_path / "summary.md").read_text()


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: Figure} of every figure saved while the test runs."""
    figures = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        figures[Path(fname).name] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def the_legend(figure: Figure) -> dict[str, tuple]:
    """The figure's only legend, as {label: colour of its handle}."""
    legends = [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend() is not None)]
    assert len(legends) == 1, f"{len(legends)} legends"
    handles = legends[0].legend_handles
    return {text.get_text(): to_rgb(h.get_facecolor() if isinstance(h, Patch) else h.get_color())
            for text, h in zip(legends[0].get_texts(), handles)}


MIXED = [  # methods differ between panels: ss has all four, sh two, mh two others
    *(result(m, [0.6, 0.7, 0.5], scenario="ss", calibration=c)
      for m in ("purer", "purer_ei", "average", "random") for c in ("plain", "icfil")),
    *(result(m, [0.5, 0.6, 0.4], scenario="sh") for m in ("purer_ei", "random")),
    *(result(m, [0.5, 0.6, 0.4], scenario="mh", shot=s) for m in ("purer", "purer_ei") for s in (1, 5)),
]
CURVES = {"ss/purer/1shot": [(0, 30.0), (10, 40.0)], "ss/purer/5shot": [(0, 35.0), (10, 50.0)],
          "ss/purer_ei/1shot": [(0, 30.0), (10, 38.0)], "mh/purer_ei/1shot": [(0, 25.0), (10, 33.0)],
          "mh/purer_ei/5shot": [(0, 28.0), (10, 41.0)], "sh/random/1shot": []}


def test_accuracy_figure_gives_each_method_one_colour_and_one_legend_with_every_method(tmp_path, saved_figures):
    write_report(MIXED, CURVES, tmp_path, tmp_path / "metrics.json", "make run")
    accuracy = saved_figures["accuracy.png"]
    legend = the_legend(accuracy)
    assert list(legend) == ["purer", "purer_ei", "average", "random"]  # every method of the run, in order
    assert len(set(legend.values())) == 4  # distinct colours
    panels = 0
    for ax in accuracy.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        panels += bool(bars)
        for container in bars:
            colours = {to_rgb(patch.get_facecolor()) for patch in container.patches}
            assert colours == {legend[container.get_label()]}, (ax.get_title(), container.get_label())
    assert panels == 3


def test_metaval_curves_colour_by_method_as_in_the_accuracy_figure_with_one_legend(tmp_path, saved_figures):
    write_report(MIXED, CURVES, tmp_path, tmp_path / "metrics.json", "make run")
    accuracy = saved_figures["accuracy.png"]
    legend = {c.get_label(): to_rgb(c.patches[0].get_facecolor())
              for ax in accuracy.axes for c in ax.containers if isinstance(c, BarContainer)}
    curves = saved_figures["metaval_curves.png"]
    curve_legend = the_legend(curves)
    assert {"purer", "purer_ei"} <= set(curve_legend) and "random" not in curve_legend  # no curve, no entry
    lines = [(ax.get_title(), line) for ax in curves.axes for line in ax.get_lines()
             if not line.get_label().startswith("_")]
    assert len(lines) == 5
    for title, line in lines:
        method = line.get_label().split("/")[0]
        assert to_rgb(line.get_color()) == curve_legend[method], (title, line.get_label())
        assert curve_legend[method] == legend[method]  # the same colour as in the accuracy figure
    styles = {line.get_label().split("/")[1]: line.get_linestyle() for _, line in lines}
    assert styles["1shot"] != styles["5shot"]  # shot told apart by line style, named in the legend
    assert {"1-shot", "5-shot"} <= set(curve_legend)


def test_accuracy_against_time_puts_each_trained_run_at_its_cost_and_references_as_lines(tmp_path, saved_figures):
    costs = [{"scenario": "ss", "method": "purer", "shot": 1, "iterations": 3, "seconds": 12.0, "api_queries": None},
             {"scenario": "ss", "method": "purer_ei", "shot": 1, "iterations": 3, "seconds": 4.0,
              "api_queries": 2_500_000},
             {"scenario": "mh", "method": "purer", "shot": 5, "iterations": 3, "seconds": 30.0, "api_queries": None}]
    write_report(MIXED, CURVES, tmp_path, tmp_path / "metrics.json", "make run", costs=costs)
    figure = saved_figures["accuracy_vs_time.png"]
    legend = the_legend(figure)
    assert {"purer", "purer_ei", "average", "random", "1-shot", "5-shot"} <= set(legend)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_title()}
    ss = panels["scenario ss"]
    points = sorted(tuple(line.get_xydata()[0]) for line in ss.get_lines() if line.get_marker() == "o")
    assert points == [(4.0, pytest.approx(60.0)), (12.0, pytest.approx(60.0))]  # plain only, at their cost
    mh = [line for line in panels["scenario mh"].get_lines() if line.get_marker() == "s"]  # 5-shot: squares
    assert [tuple(line.get_xydata()[0]) for line in mh] == [(30.0, pytest.approx(50.0))]
    references = [line for line in ss.get_lines() if line.get_linestyle() == ":"]
    assert len(references) == 2  # average and random: no cost, one dotted line each
    assert [t.get_text() for t in ss.texts] == ["2.5 M queries"]
    assert ss.get_xscale() == "linear" and panels["scenario mh"].get_xscale() == "linear"  # 4 to 12 s: linear
    write_report(MIXED, CURVES, tmp_path, tmp_path / "metrics.json", "make run",
                 costs=[{**costs[0], "seconds": 400.0}, *costs[1:]])
    assert [ax.get_xscale() for ax in saved_figures["accuracy_vs_time.png"].axes if ax.get_title() == "scenario ss"
            ] == ["log"]  # 4 to 400 s
    write_report(MIXED, CURVES, tmp_path / "no_costs", tmp_path / "m.json", "make run")
    assert not (tmp_path / "no_costs" / "plots" / "accuracy_vs_time.png").exists()  # nothing to plot against


def test_the_leaderboard_ranks_methods_with_their_difference_to_purer_and_their_cost():
    from dfml.report import leaderboard, leaderboard_markdown

    results = [result("purer", [0.5, 0.6, 0.7, 0.6]), result("taco", [0.8, 0.9, 0.9, 0.8]),
               result("random", [0.2, 0.2, 0.2, 0.2]), result("purer", [0.6, 0.7, 0.8, 0.7], shot=5),
               result("taco", [0.9, 0.9, 0.9, 0.8], shot=5), result("random", [0.2, 0.2, 0.2, 0.2], shot=5),
               result("purer", [0.7, 0.7, 0.8, 0.7], calibration="icfil"), result("average", [0.3, 0.4, 0.3, 0.3],
                                                                               scenario="sh")]
    costs = [{"scenario": "ss", "method": "taco", "shot": 1, "iterations": 4, "seconds": 80.0, "api_queries": 1200},
             {"scenario": "ss", "method": "purer", "shot": 5, "iterations": 4, "seconds": 20.0, "api_queries": None}]
    rows = leaderboard(results, costs)
    plain = [r for r in rows if (r["scenario"], r["calibration"]) == ("ss", "plain")]
    assert [r["method"] for r in plain] == ["taco", "purer", "random"]  # by mean accuracy over shots
    taco = plain[0]["shots"]
    assert taco[1]["difference"]["difference"] == pytest.approx(25.0) and taco[1]["cost"]["seconds"] == 80.0
    assert plain[1]["shots"][1]["difference"] is None  # the reference itself
    diffs = [c["difference"] for r in rows for c in r["shots"].values() if c["difference"] is not None]
    assert len(diffs) == 4  # taco and random at 1 and 5 shots; icfil and sh have no other method / no purer
    by = {(r["method"], r["shot"], r["calibration"]): r["accuracies"] for r in results if r["scenario"] == "ss"}
    raw = [paired_difference(by[(d["a"], d["shot"], d["calibration"])], by[(d["b"], d["shot"], d["calibration"])]
                             ).p_value for d in diffs]
    assert [d["p_holm"] for d in diffs] == pytest.approx(holm_adjust(raw), rel=1e-2)  # its own family of 4
    text = "\n".join(leaderboard_markdown(rows))
    assert "### ss, plain" in text and "### sh, plain" in text and "Holm over the 4 differences" in text
    assert "| 1 | taco | 85.00 +- " in text and "| 80 / - | 1,200 / - |" in text
    assert "| 2 | purer | 60.00 +- " in text and "| - / 20 | - |" in text
    assert "| 1 | average | 32.50 +- " in text  # no purer in sh: ranked, no difference
    assert leaderboard_markdown([]) == []


def test_several_protocols_keep_the_cost_of_their_scenario(tmp_path, saved_figures):
    from dfml.report import leaderboard

    results = [{**result("purer", [0.5, 0.6, 0.7]), "scenario": "ss:test10"},
               {**result("taco", [0.8, 0.9, 0.9]), "scenario": "ss:test10"}]
    costs = [{"scenario": "ss", "method": "taco", "shot": 1, "iterations": 4, "seconds": 80.0, "api_queries": None}]
    assert leaderboard(results, costs)[0]["shots"][1]["cost"]["seconds"] == 80.0
    write_report(results, {}, tmp_path, tmp_path / "metrics.json", "make run", costs=costs)
    ax = next(ax for ax in saved_figures["accuracy_vs_time.png"].axes if ax.get_title() == "scenario ss:test10")
    assert [tuple(line.get_xydata()[0]) for line in ax.get_lines() if line.get_marker() == "o"] == [
        (80.0, pytest.approx(86.667, abs=1e-3))]


def test_training_cost_sums_iteration_time_and_reads_the_api_budget(tmp_path):
    from dfml.report import training_cost

    black = tmp_path / "results/metatrain/ss/bidfmkd/seed0/shot5/curve.csv"
    black.parent.mkdir(parents=True)
    black.write_text("iteration,meta_loss,meta_accuracy,generated,api_queries,api_seconds,seconds,val_test1\n"
                     "0,,,,,,,0.2\n1,1.5,0.3,1,1200,2.0,2.5,\n2,1.4,0.4,0,1200,2.0,0.25,0.3\n"
                     "3,1.3,0.5,1,2400,3.75,2.25,\n")
    white = tmp_path / "results/metatrain/ss/purer/seed0/shot5/curve.csv"
    white.parent.mkdir(parents=True)
    # PURER's row of iteration 0: the warm start's seconds, charged to its budget (dfml/metatrain.py)
    white.write_text("iteration,meta_loss,meta_accuracy,seconds,val_test1\n0,,,2.0,0.2\n1,1.0,0.5,0.5,0.3\n")
    costs = [training_cost(black), training_cost(white)]
    assert costs == [{"scenario": "ss", "method": "bidfmkd", "training_seed": 0, "shot": 5, "iterations": 3,
                      "seconds": 5.0, "warm_start_seconds": None, "api_queries": 2400, "api_seconds": 3.8},
                     {"scenario": "ss", "method": "purer", "training_seed": 0, "shot": 5, "iterations": 1,
                      "seconds": 2.5, "warm_start_seconds": 2.0, "api_queries": None, "api_seconds": None}]
    text = summary_markdown(RESULTS, [], "make run", costs)
    assert "| ss | purer | 5 | 1 | 2.0 | 2.5 | - | - |" in text
    assert "| ss | bidfmkd | 5 | 3 | - | 5.0 | 2,400 | 3.8 |" in text
    assert text.index("| ss | purer |") < text.index("| ss | bidfmkd |")  # purer first, as in every table


def test_costs_of_several_training_seeds_are_their_seed_means():
    from dfml.report import seed_mean_costs

    runs = [{"scenario": "ss", "method": "purer", "training_seed": t, "shot": 1, "iterations": it, "seconds": sec,
             "warm_start_seconds": 2.0, "api_queries": None, "api_seconds": None}
            for t, it, sec in ((0, 10, 30.0), (1, 13, 33.0), (2, 12, 36.0))]
    [mean] = seed_mean_costs(runs)
    assert mean == {"scenario": "ss", "method": "purer", "shot": 1, "seeds": 3, "iterations": 12, "seconds": 33.0,
                    "warm_start_seconds": 2.0, "api_queries": None, "api_seconds": None}


def test_benchmark_table_ranks_methods_and_lines_up_protocols_calibrations_and_iterations(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import benchmark_table

    def entry(accuracy):
        return {"accuracy": accuracy, "ci95": 1.5, "episodes": 600}

    metrics = {
        "ss:test1": {"purer": {"1shot": {"plain": entry(30.0), "icfil": entry(40.0)},
                               "5shot": {"plain": entry(40.0), "icfil": entry(50.0)}},
                     "random": {"1shot": {"plain": entry(20.0)}, "5shot": {"plain": entry(20.0)}},
                     "taco": {"1shot": {"plain": entry(50.0), "icfil": entry(51.0)},
                              "5shot": {"plain": entry(60.0), "icfil": entry(61.0)}}},
        "ss:test10": {"purer": {"1shot": {"plain": entry(33.0)}, "5shot": {"plain": entry(44.0)}}},
    }
    for method, reached in (("purer", (3, 2)), ("taco", (1, 1))):
        for shot, n in zip((1, 5), reached):
            curve = tmp_path / "ss" / method / "seed0" / f"shot{shot}" / "curve.csv"
            curve.parent.mkdir(parents=True)
            curve.write_text("iteration,seconds,val_test1\n0,,0.2\n" + "".join(f"{i},40.0,\n" for i in range(1, n + 1)))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    benchmark_table.main(["--scenario", "ss", "--metrics", str(tmp_path / "metrics.json"), "--metatrain", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| method | 1-shot | 5-shot | 1-shot ICFIL | 5-shot ICFIL | 1-shot, 10 steps | 5-shot, 10 steps "
                        "| iterations |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| taco", "| purer", "| random"]
    assert lines[3] == ("| purer | 30.00 +- 1.50 | 40.00 +- 1.50 | 40.00 +- 1.50 | 50.00 +- 1.50 | 33.00 +- 1.50 "
                        "| 44.00 +- 1.50 | 3 / 2 |")
    assert lines[4].endswith("| 20.00 +- 1.50 | 20.00 +- 1.50 | - | - | - | - | - |")
    with pytest.raises(SystemExit, match="no results for sh:test1"):
        benchmark_table.main(["--scenario", "sh", "--metrics", str(tmp_path / "metrics.json")])

    published = tmp_path / "published.yaml"
    published.write_text("ss:\n  purer: {1shot: [38.66, 0.78], 5shot: [51.95, 0.79], source: poster}\n"
                         "  taco: {1shot: [39.13, null], mark: '‡'}\n  dro: {1shot: [23.9, 0.5]}\n")
    args = ["--scenario", "ss", "--metrics", str(tmp_path / "metrics.json"), "--metatrain", str(tmp_path)]
    benchmark_table.main(args + ["--published", str(published)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| iterations | paper 1-shot / 5-shot |") and lines[1].count("---") == 9
    assert lines[2].endswith("| 1 / 1 | 39.13 / - ‡ |")  # the mark: read with care
    assert lines[3].endswith("| 3 / 2 | 38.66 / 51.95 |")
    assert lines[4].endswith("| - | - |") and len(lines) == 5  # no paper row for random; none added for dro
    published.write_text("sh:\n  purer: {1shot: [39.15, 0.70]}\n")
    with pytest.raises(SystemExit, match="no published numbers for ss \\(it has: sh\\)"):
        benchmark_table.main(args + ["--published", str(published)])
    published.write_text("ss:\n  purer: {1shot: 38.66}\n")
    with pytest.raises(SystemExit, match="ss.purer.1shot must be \\[mean, ci95\\], not 38.66"):
        benchmark_table.main(args + ["--published", str(published)])

    seeded = {"seeds": 3, "ci_over": "seeds"}
    other_run = {"sh:test1": {
        "purer": {"1shot": {"plain": entry(25.0) | seeded}, "5shot": {"plain": entry(26.0) | seeded}},
        "tgr": {"1shot": {"plain": entry(27.04) | seeded}, "5shot": {"plain": entry(29.96) | seeded}}}}
    (tmp_path / "sh.json").write_text(json.dumps(other_run))
    benchmark_table.main(["--overview", "--metrics", str(tmp_path / "metrics.json"), str(tmp_path / "sh.json")])
    assert capsys.readouterr().out.splitlines() == [
        "| method (1-shot / 5-shot) | ss | sh (3 seeds) |", "|---|---|---|",  # a one-run scenario names no seeds
        "| taco | 50.0 / 60.0 | - |",  # ranked by the mean over the cells a method has
        "| purer | 30.0 / 40.0 | 25.0 / 26.0 |",
        "| tgr | - | 27.0 / 30.0 |",
        "| random | 20.0 / 20.0 | - |"]
    (tmp_path / "ten_steps_only.json").write_text(json.dumps({"ss:test10": {}}))
    with pytest.raises(SystemExit, match="no 1-step"):
        benchmark_table.main(["--overview", "--metrics", str(tmp_path / "ten_steps_only.json")])


def test_benchmark_table_prints_the_pre_registered_comparisons_as_the_report_wrote_them(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import benchmark_table
    from dfml import report

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=200)

    def run(method, protocol, shot, calibration, shift):
        return {"scenario": f"ss:{protocol}", "method": method, "shot": shot, "calibration": calibration,
                "accuracies": list(np.clip(base + shift + rng.normal(0, 0.001, 200), 0, 1))}

    results = []
    for shot in (1, 5):
        results += [run("purer", "test1", shot, "plain", 0.1), run("random", "test1", shot, "plain", -0.1),
                    run("purer_ei", "test1", shot, "plain", 0.1), run("purer", "test1", shot, "icfil", 0.15),
                    run("purer_ei", "test1", shot, "icfil", 0.05), run("purer", "test10", shot, "plain", 0.2),
                    run("random", "test10", shot, "plain", 0.0), run("purer_ei", "test10", shot, "plain", 0.2)]
    rows = report.comparisons(results, pairs=[["purer", "random"], ["purer", "purer_ei"]])
    (tmp_path / "comparisons.csv").write_text(report.to_csv(rows))
    benchmark_table.main(["--comparisons", str(tmp_path / "comparisons.csv")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| comparison | plain | ICFIL | 10 steps |", "|---|---|---|---|"]
    def cells(line):  # "| a - b | x / y | ... |" -> name, [[x, y], ...] ([] for an empty cell)
        name, *columns = line.strip("| ").split(" | ")
        return name, [column.split(" / ") if column.strip() else [] for column in columns]

    # The config's order (purer - random has no ICFIL rows, so the plain rows must set the order).
    name, (plain, icfil, steps) = cells(lines[2])
    assert name == "purer - random" and icfil == []
    for text in plain + steps:  # +20 points, bold: significant after Holm over the whole file
        assert text.startswith("**") and text.endswith("**") and abs(float(text.strip("*")) - 20) < 1
    name, (plain, icfil, steps) = cells(lines[3])
    assert name == "purer - purer_ei"
    assert all(abs(float(text)) < 0.5 for text in plain + steps)  # the same shift: level, not bold
    assert [round(float(text.strip("*"))) for text in icfil] == [10, 10] and all("**" in t for t in icfil)
    assert lines[5] == "ICFIL against plain: -5.0 to +5.0 points over 4 method-shot cells, 4 significant."
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SystemExit, match="no rows"):
        benchmark_table.main(["--comparisons", str(tmp_path / "empty.csv")])


def test_seed_mean_costs_keep_counts_whole():
    runs = [{"scenario": "ss", "method": "bidfmkd", "shot": 1, "training_seed": t, "iterations": 30 + t,
             "seconds": 10.0 + t, "api_queries": 33_300 + 100 * t} for t in range(2)]
    from dfml.report import seed_mean_costs

    (mean,) = seed_mean_costs(runs)
    assert mean["api_queries"] == 33_350 and isinstance(mean["api_queries"], int)
    assert mean["iterations"] == 30 and mean["seconds"] == 10.5 and mean["seeds"] == 2
    assert f"{mean['api_queries']:,}" == "33,350"  # as the cost table writes it (was 33,350.0)
