"""Training seeds in the report: seed means and CIs, paired differences over seeds, a method's own start."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dfml.replicates import MIN_SEEDS, aggregate, group_seeds, replicated_difference, summarise, variance_note
from dfml.report import comparisons, leaderboard, metrics, summary_markdown

EPISODES = 60


def result(method, seed, accuracies, scenario="ss", shot=1, calibration="plain", **extra):
    accuracies = [float(a) for a in accuracies]
    return {"scenario": scenario, "method": method, "shot": shot, "calibration": calibration,
            "training_seed": seed, "mean": float(np.mean(accuracies)), "ci95": 0.0, "accuracies": accuracies,
            "episodes": len(accuracies), "per_dataset": {"glyphs": {"episodes_sha256": "same"}}, **extra}


def runs_of(level_per_seed, noise=0.02, seed=0):
    """Per seed: EPISODES accuracies around that seed's level (small episode noise)."""
    rng = np.random.default_rng(seed)
    return {s: np.clip(level + rng.normal(0, noise, EPISODES), 0, 1) for s, level in enumerate(level_per_seed)}


def test_one_seed_keeps_the_episode_view():
    accuracies = runs_of([0.5])[0]
    cell = summarise({0: result("purer", 0, accuracies)})
    mean, half = np.mean(accuracies), stats.t.ppf(0.975, EPISODES - 1) * stats.sem(accuracies)
    assert cell.ci_over == "episodes" and cell.seeds == 1
    assert cell.mean == pytest.approx(mean) and cell.ci95 == pytest.approx(half) == pytest.approx(cell.episode_ci95)


def test_seeds_give_the_seed_mean_and_a_t_interval_over_the_seed_means():
    runs = runs_of([0.40, 0.50, 0.45, 0.55])
    cell = summarise({s: result("purer", s, a) for s, a in runs.items()})
    means = [np.mean(a) for a in runs.values()]
    assert cell.ci_over == "seeds" and cell.seeds == 4
    assert cell.mean == pytest.approx(np.mean(means))
    assert cell.ci95 == pytest.approx(stats.t.ppf(0.975, 3) * stats.sem(means))
    # the within-run view, over the seed-averaged episodes, is far narrower: it cannot see the seeds' spread
    averaged = np.mean(np.stack(list(runs.values())), axis=0)
    assert cell.episode_ci95 == pytest.approx(stats.t.ppf(0.975, EPISODES - 1) * stats.sem(averaged))
    assert cell.episode_ci95 < cell.ci95 / 3


def test_a_difference_over_seeds_is_the_t_test_of_the_per_seed_differences():
    a = {s: result("purer", s, x) for s, x in runs_of([0.50, 0.58, 0.47], seed=1).items()}
    b = {s: result("free", s, x) for s, x in runs_of([0.45, 0.49, 0.46], seed=2).items()}
    diff = replicated_difference(a, b)
    per_seed = [a[s]["mean"] - b[s]["mean"] for s in range(3)]
    test = stats.ttest_1samp(per_seed, 0.0)
    assert diff.unit == "seeds" and diff.n == diff.seeds == 3 and diff.episodes == EPISODES
    assert diff.mean == pytest.approx(np.mean(per_seed)) and diff.p_value == pytest.approx(test.pvalue)
    low, high = test.confidence_interval(0.95)
    assert (diff.mean - diff.ci95, diff.mean + diff.ci95) == pytest.approx((low, high))


def test_training_variance_can_undo_what_the_episodes_of_one_run_call_significant():
    """Seed 0 of A beats seed 0 of B by 5 points with tiny episode noise (significant over its 60 episodes);
    over 5 seeds A and B trade places, and the test over seeds finds no difference."""
    a = {s: result("a", s, x) for s, x in runs_of([0.55, 0.45, 0.50, 0.43, 0.52], seed=3).items()}
    b = {s: result("b", s, x) for s, x in runs_of([0.50, 0.52, 0.47, 0.49, 0.46], seed=4).items()}
    one_run = replicated_difference({0: a[0]}, {0: b[0]})
    assert one_run.unit == "episodes" and one_run.excludes_zero and one_run.p_value < 1e-6
    over_seeds = replicated_difference(a, b)
    assert over_seeds.unit == "seeds" and not over_seeds.excludes_zero and over_seeds.p_value > 0.05


def test_fewer_seeds_than_the_minimum_pair_the_seed_averaged_episodes():
    a = {s: result("a", s, x) for s, x in runs_of([0.5, 0.6], seed=5).items()}
    b = {s: result("b", s, x) for s, x in runs_of([0.4, 0.5], seed=6).items()}
    assert MIN_SEEDS > 2
    diff = replicated_difference(a, b)
    a_avg = (a[0]["accuracies"] + np.array(a[1]["accuracies"])) / 2
    b_avg = (b[0]["accuracies"] + np.array(b[1]["accuracies"])) / 2
    test = stats.ttest_rel(a_avg, b_avg)
    assert diff.unit == "episodes" and diff.n == EPISODES and diff.seeds == 2
    assert diff.mean == pytest.approx(np.mean(a_avg - b_avg)) and diff.p_value == pytest.approx(test.pvalue)


def test_a_seedless_baseline_is_the_same_model_for_every_seed():
    a = {s: result("purer", s, x) for s, x in runs_of([0.50, 0.58, 0.47]).items()}
    average = {None: result("average", None, runs_of([0.3], seed=9)[0])}
    diff = replicated_difference(a, average)
    per_seed = [a[s]["mean"] - average[None]["mean"] for s in range(3)]
    assert diff.unit == "seeds" and diff.seeds == 3 and diff.mean == pytest.approx(np.mean(per_seed))
    reverse = replicated_difference(average, a)
    assert reverse.mean == pytest.approx(-diff.mean) and reverse.p_value == pytest.approx(diff.p_value)


def test_seeds_without_a_seed_in_common_or_twice_are_refused():
    a = {0: result("a", 0, [0.5, 0.6])}
    with pytest.raises(ValueError, match="no training seed in common"):
        replicated_difference(a, {1: result("b", 1, [0.5, 0.6])})
    with pytest.raises(ValueError, match="two results for training seed 0"):
        group_seeds([result("a", 0, [0.5]), result("a", 0, [0.6])])


def test_report_tables_and_metrics_show_seed_means_and_say_what_their_intervals_hold():
    results = [result("purer", s, x) for s, x in runs_of([0.50, 0.58, 0.47]).items()]
    results += [result("purer_ei", s, x) for s, x in runs_of([0.45, 0.49, 0.46], seed=1).items()]
    tree = metrics(aggregate(results))["ss"]["purer"]["1shot"]["plain"]
    assert tree["seeds"] == 3 and tree["ci_over"] == "seeds" and set(tree["per_seed"]) == {"0", "1", "2"}
    assert tree["accuracy"] == pytest.approx(100 * np.mean([r["mean"] for r in results[:3]]), abs=1e-3)
    rows = comparisons(results)
    assert [(r["a"], r["b"], r["over"], r["seeds"]) for r in rows] == [("purer", "purer_ei", "seeds", 3)]
    board = leaderboard(results)
    assert board[0]["shots"][1]["ci_over"] == "seeds" and board[0]["shots"][1]["seeds"] == 3
    summary = summary_markdown(results, rows, "make run")
    assert "3 training seeds" in summary and "include training variance" in summary
    one = summary_markdown(results[:1] + results[3:4], comparisons(results[:1] + results[3:4]), "make run")
    assert "One training seed" in one and "do **not** include training variance" in one
    assert "One training seed" in variance_note([result("a", None, [0.5])])


# --- a comparison with a method's own start, resolved from what its meta-model cards say ---------------------

def scenario_results(scenario, taco_init, baselines):
    """TACO (ProtoNet) starting from ``taco_init`` over 3 seeds, and the baselines {name: (init, learner, level)}."""
    out = [result("taco", s, x, scenario=scenario, init=taco_init, learner="protonet", baseline=False)
           for s, x in runs_of([0.60, 0.62, 0.61], seed=7).items()]
    for i, (name, (init, learner, level)) in enumerate(baselines.items()):
        seeds = [None] if init != "random" else [0, 1, 2]  # a random start is drawn per training seed
        for s in seeds:
            out.append(result(name, s, runs_of([level], seed=20 + i)[0], scenario=scenario, init=init,
                              learner=learner, baseline=True))
    return out


BASELINES = {"random": ("random", "maml", 0.20), "average": ("average", "maml", 0.26),
             "random_protonet": ("random", "protonet", 0.47), "average_protonet": ("average", "protonet", 0.52)}


@pytest.mark.parametrize("scenario, init, expected", [("ss", "average", "average_protonet"),
                                                       ("sh", "random", "random_protonet")])
def test_a_comparison_with_start_names_the_baseline_the_method_really_started_from(scenario, init, expected):
    baselines = BASELINES if scenario == "ss" else {k: v for k, v in BASELINES.items() if v[0] == "random"}
    results = scenario_results(scenario, init, baselines)
    [row] = comparisons(results, [["taco", "start"]])[:1]
    assert row["b"] == f"{expected} (start)"
    start = [r for r in results if r["method"] == expected]
    taco = [r for r in results if r["method"] == "taco"]
    by_seed = {r["training_seed"]: r["mean"] for r in start}
    per_seed = [t["mean"] - by_seed.get(t["training_seed"], by_seed.get(None)) for t in taco]
    assert row["difference"] == pytest.approx(100 * np.mean(per_seed), abs=1e-3) and row["over"] == "seeds"


def test_a_change_of_init_changes_the_start_not_the_comparison():
    as_average = comparisons(scenario_results("ss", "average", BASELINES), [["taco", "start"]])[0]
    as_random = comparisons(scenario_results("ss", "random", BASELINES), [["taco", "start"]])[0]
    assert as_average["b"] == "average_protonet (start)" and as_random["b"] == "random_protonet (start)"


def test_a_pair_named_again_as_a_start_is_one_row_and_one_test_of_the_holm_family():
    results = scenario_results("ss", "average", BASELINES)
    rows = comparisons(results, [["taco", "average_protonet"], ["taco", "random"], ["taco", "start"]])
    assert [(r["a"], r["b"]) for r in rows] == [("taco", "average_protonet (start)"), ("taco", "random")]
    apart = comparisons(results, [["taco", "average_protonet"], ["taco", "random"]])
    assert [r["p_holm"] for r in rows] == [r["p_holm"] for r in apart]  # a family of 2, not 3
    assert [r["difference"] for r in rows] == [r["difference"] for r in apart]
    only_start = comparisons(results, [["taco", "start"]])
    assert [(r["a"], r["b"]) for r in only_start] == [("taco", "average_protonet (start)")]


def test_a_start_that_the_run_did_not_score_or_did_not_record_is_named():
    results = scenario_results("sh", "random", {"random": BASELINES["random"]})
    with pytest.raises(ValueError, match=r"random initialisation scored with protonet.*metatest.baselines"):
        comparisons(results, [["taco", "start"]])
    unrecorded = [{k: v for k, v in r.items() if k not in ("init", "learner")} for r in results]
    with pytest.raises(ValueError, match="do not say where it started"):
        comparisons(unrecorded, [["taco", "start"]])
    assert math.isfinite(comparisons(results, [["taco", "random"]])[0]["difference"])


def test_training_seed_zero_draws_what_a_run_without_seeds_drew_and_others_draw_apart():
    from dfml.seeds import derive_seed, training_draw

    assert training_draw({"seed": 7}, 201) == training_draw({"seed": 7, "training_seed": 0}, 201) == derive_seed(7, 201)
    draws = {training_draw({"seed": 7, "training_seed": t}, 202, 1) for t in range(5)}
    assert len(draws) == 5  # every seed its own draw
    assert training_draw({"seed": 7, "training_seed": 1}, 201) != training_draw({"seed": 7, "training_seed": 1}, 202)


# --- comparing a finished run with recorded results (tools/replicate.py) -----------------------------------

def test_a_cells_fingerprint_changes_with_any_episode_by_one_ulp():
    results = [result("purer", s, x) for s, x in runs_of([0.50, 0.58, 0.47]).items()]
    first = aggregate(results)[0]["sha256"]
    assert aggregate([dict(r) for r in results])[0]["sha256"] == first
    nudged = [dict(r) for r in results]
    nudged[1] = {**nudged[1], "accuracies": [math.nextafter(nudged[1]["accuracies"][0], 1.0)] + nudged[1]["accuracies"][1:]}
    assert aggregate(nudged)[0]["sha256"] != first


def test_replication_verdicts_identical_within_outside_missing():
    from dfml.replication import compare, markdown

    def tree(**cells):
        return {"ss": {m: {"1shot": {"plain": c}} for m, c in cells.items()}}

    recorded = tree(purer={"accuracy": 40.0, "ci95": 2.0, "ci_over": "seeds", "sha256": "a"},
                    free={"accuracy": 30.0, "ci95": 1.0, "ci_over": "episodes", "sha256": "b"},
                    tgr={"accuracy": 35.0, "ci95": 1.0, "ci_over": "seeds", "sha256": "c"})
    run = tree(purer={"accuracy": 40.0, "sha256": "a"}, free={"accuracy": 31.4, "sha256": "x"},
               tgr={"accuracy": 36.5, "sha256": "y"}, taco={"accuracy": 50.0, "sha256": "z"})
    verdicts = {c.cell: c.verdict for c in compare(run, recorded)}
    assert verdicts == {"ss/purer/1shot/plain": "identical", "ss/free/1shot/plain": "within",  # 1.4 <= 1.41
                        "ss/tgr/1shot/plain": "outside", "ss/taco/1shot/plain": "missing"}  # 1.5 > 1.41
    text = "\n".join(markdown(compare(run, recorded)))
    assert text.startswith("1 identical, 1 within, 1 outside, 1 missing of 4 cells\n"
                           "- plain: |run - recorded| median 1.40, largest 1.50 (ss/tgr/1shot/plain) over 3 cells")
    assert "| ss/tgr/1shot/plain | outside | 36.50 | 35.00 | 1.41 | seeds |" in text
    assert "one seed: training variance not included" in text  # free's record is over episodes only


def test_replication_distances_go_per_calibration_over_the_cells_both_sides_have():
    """What a second seed set is reported by: per calibration, the median and the largest |run - recorded|."""
    from dfml.replication import compare, distances

    def cell(x):
        return {"accuracy": x, "ci95": 1.0, "ci_over": "seeds"}

    recorded = {"ss": {"purer": {"1shot": {"plain": cell(40.0), "icfil": cell(50.0)},
                                 "5shot": {"plain": cell(60.0), "icfil": cell(70.0)}},
                       "tgr": {"1shot": {"plain": cell(30.0)}}}}
    run = {"ss": {"purer": {"1shot": {"plain": cell(41.0), "icfil": cell(47.0)},
                            "5shot": {"plain": cell(59.5), "icfil": cell(70.5)}},
                  "free": {"1shot": {"plain": cell(10.0)}}}}
    assert distances(compare(run, recorded)) == [
        "icfil: |run - recorded| median 1.75, largest 3.00 (ss/purer/1shot/icfil) over 2 cells",
        "plain: |run - recorded| median 0.75, largest 1.00 (ss/purer/1shot/plain) over 2 cells"]
    assert distances(compare(run, {})) == []


def test_a_replay_of_one_seed_matches_the_records_run_of_that_seed_bit_for_bit(tmp_path, capsys):
    """What a pin file replays: one seed's result files, checked against a 3-seed record (tools/replicate.py
    --result): identical to the record's run of that seed, not to another seed's; one ulp off: within."""
    import importlib.util

    from dfml.replication import check_results
    from dfml.report import metrics

    runs = runs_of([0.50, 0.58, 0.47])
    results = [result("purer", s, x, protocol="test1") for s, x in runs.items()]
    recorded = metrics(aggregate(results))
    assert set(recorded["ss"]["purer"]["1shot"]["plain"]["per_seed_sha256"]) == {"0", "1", "2"}
    replay = result("purer", 1, runs[1], protocol="test1")
    [check] = check_results([replay], recorded)
    assert (check.cell, check.verdict) == ("ss/purer/1shot/plain (training seed 1)", "identical")
    assert check_results([{**replay, "training_seed": 2}], recorded)[0].verdict == "within"  # seed 1's run as seed 2
    nudged = {**replay, "accuracies": [math.nextafter(replay["accuracies"][0], 1.0)] + replay["accuracies"][1:]}
    assert check_results([nudged], recorded)[0].verdict == "within"
    far = result("purer", 1, runs[1] * 0.5, protocol="test1")
    assert check_results([far], recorded)[0].verdict == "outside"
    assert check_results([{**replay, "method": "tgr"}], recorded)[0].verdict == "missing"

    spec = importlib.util.spec_from_file_location("replicate", Path(__file__).resolve().parents[1] / "tools" / "replicate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "recorded.json").write_text(json.dumps(recorded))
    (tmp_path / "replay.json").write_text(json.dumps(replay))
    assert tool.main(["--result", str(tmp_path / "replay.json"), "--recorded", str(tmp_path / "recorded.json")]) == 0
    assert capsys.readouterr().out.startswith("1 identical, 0 within, 0 outside, 0 missing of 1 cells")
    with pytest.raises(SystemExit, match="--result .*missing.json: no such file"):
        tool.main(["--result", str(tmp_path / "missing.json"), "--recorded", str(tmp_path / "recorded.json")])


def test_seed_fingerprints_are_added_to_an_older_record_only_from_the_files_of_its_run(tmp_path):
    """tools/seed_fingerprints.py: a record without per-seed fingerprints gets them from result files that
    recompute its cells' fingerprints; a file one ulp off is refused, naming its cell."""
    import importlib.util

    from dfml.report import metrics

    spec = importlib.util.spec_from_file_location(
        "seed_fingerprints", Path(__file__).resolve().parents[1] / "tools" / "seed_fingerprints.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    runs = runs_of([0.50, 0.58, 0.47])
    results = [result("purer", s, x, protocol="test1") for s, x in runs.items()]
    expected = metrics(aggregate(results))
    older = json.loads(json.dumps(expected))
    del older["ss"]["purer"]["1shot"]["plain"]["per_seed_sha256"]
    record = tmp_path / "record.json"
    record.write_text(json.dumps(older))
    files = tmp_path / "metatest"
    files.mkdir()
    for r in results:
        (files / f"seed{r['training_seed']}.json").write_text(json.dumps(r))
    assert tool.main(["--results", str(files), "--record", str(record)]) == 0
    assert json.loads(record.read_text()) == expected
    nudged = {**results[2], "accuracies": [math.nextafter(results[2]["accuracies"][0], 1.0)] + results[2]["accuracies"][1:]}
    (files / "seed2.json").write_text(json.dumps(nudged))
    record.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="ss/purer/1shot/plain: the result files do not recompute"):
        tool.main(["--results", str(files), "--record", str(record)])
