"""Report: metrics.json, plot CSVs, figures and summary.md from the meta-test results.

Every meta-test result holds per-episode accuracies on the same fixed episodes, so the report
compares methods with paired differences (mean, 95% CI and paired t-test p-value, both from Student's t
with n - 1 dof, see :mod:`dfml.evaluation.stats`). The "significant" column is Holm-corrected over the family of
all paired comparisons of the run; raw and Holm-adjusted p-values are both kept.

Figures give every method one colour, fixed for the whole run (:func:`method_colours`), and one legend
that lists every method. Tables, figures and comparisons list the methods in the config's order
(:func:`method_order`: params.yaml's ``methods``, then ``metatest.baselines``), which the report script is
given and sets for its run (:func:`ordered_methods`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dfml.data.store import atomic_write_text  # noqa: E402
from dfml.evaluation.stats import ALPHA, holm_adjust  # noqa: E402
from dfml.layout import metatrain_run  # noqa: E402
from dfml.replicates import (MIN_SEEDS, aggregate, group_seeds, replicated_difference, summarise,  # noqa: E402
                             variance_note)

CALIBRATION_ORDER = ("plain", "icfil", "steps")
REFERENCE_METHOD = "purer"
BASELINE_NAME = re.compile(r"^(random|average|ota)(_[a-z]+)?$")  # metatest.baselines' pattern in the schema
_METHOD_ORDER: ContextVar[tuple[str, ...]] = ContextVar("method_order", default=())


def load_results(paths: list[str | Path]) -> list[dict]:
    """Meta-test result JSONs. When they hold several evaluation protocols, each (scenario, protocol) is
    reported as its own scenario "<scenario>:<protocol>" (tables, comparisons, panels); with one protocol
    the names stay as they are."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    if len({r.get("protocol") for r in results}) > 1:
        for r in results:
            r["scenario"] = f"{r['scenario']}:{r['protocol']}"
    return results


def method_order(params: dict) -> list[str]:
    """The report's method order, from the config: the configured methods in params.yaml's order, then
    ``metatest.baselines`` in theirs (what the report rule passes to scripts/report.py --method-order)."""
    return [*params.get("methods", {}), *params.get("metatest", {}).get("baselines", [])]


@contextmanager
def ordered_methods(order: Iterable[str]) -> Iterator[None]:
    """Within the block, :func:`method_sort_key` (every table, figure and comparison) follows ``order``."""
    token = _METHOD_ORDER.set(tuple(order))
    try:
        yield
    finally:
        _METHOD_ORDER.reset(token)


def method_sort_key(method: str) -> tuple:
    """The methods of :func:`ordered_methods` in its order; the others after them (all of them without an order):
    the reference method (PURER), the other trained methods, then the baselines, each by name."""
    order = _METHOD_ORDER.get()
    if method in order:
        return 0, order.index(method), method
    kind = 0 if method == REFERENCE_METHOD else 2 if BASELINE_NAME.match(method) else 1
    return 1, kind, method


def calibration_sort_key(column: tuple[int, str]) -> tuple[int, int, str]:
    """(shot, calibration) columns: by shot, then plain, icfil, steps, then any other calibration."""
    shot, calibration = column
    order = CALIBRATION_ORDER.index(calibration) if calibration in CALIBRATION_ORDER else len(CALIBRATION_ORDER)
    return shot, order, calibration


def method_colours(methods) -> dict[str, tuple]:
    """One colour per method, fixed for a run: assigned in :func:`method_sort_key` order over every
    method of the run, so a method has the same colour in every panel and figure."""
    ordered = sorted(set(methods), key=method_sort_key)
    if len(ordered) <= 10:
        palette = list(matplotlib.colormaps["tab10"].colors)
    elif len(ordered) <= 20:
        palette = list(matplotlib.colormaps["tab20"].colors)
    else:
        palette = [matplotlib.colormaps["turbo"](i / (len(ordered) - 1)) for i in range(len(ordered))]
    return {method: tuple(palette[i][:3]) for i, method in enumerate(ordered)}


def run_key(result: dict) -> tuple:
    return result["scenario"], result["method"], result["shot"], result["calibration"]


def _percent(value: float) -> float | None:
    """Rounded percent; None (JSON null) for an undefined value, e.g. the unbounded CI of one episode."""
    return round(100 * value, 3) if math.isfinite(value) else None


def metrics(cells: list[dict]) -> dict:
    """{scenario: {method: {"<k>shot": {calibration: {accuracy, ci95, episodes, seeds, ci_over, ...}}}}}, in
    percent, from :func:`dfml.replicates.aggregate`'s cells: the seed mean, its CI (over seeds with enough of
    them, else over episodes: ``ci_over``) and, with several seeds, the within-run ``episode_ci95`` and each
    seed's accuracy."""
    tree: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in sorted(cells, key=run_key):
        entry = {"accuracy": round(100 * r["mean"], 3), "ci95": _percent(r["ci95"]), "episodes": r["episodes"],
                 "seeds": r.get("seeds", 1), "ci_over": r.get("ci_over", "episodes")}
        if "sha256" in r:  # every per-episode accuracy of the cell, exactly: a replication compares it
            entry["sha256"] = r["sha256"]
        if "per_seed_sha256" in r:  # the same, per training seed: a one-seed replay compares it
            entry["per_seed_sha256"] = r["per_seed_sha256"]
        if r.get("seeds", 1) > 1:
            entry["episode_ci95"] = _percent(r["episode_ci95"])
            entry["per_seed"] = {seed: round(100 * m, 3) for seed, m in r["per_seed"].items()}
        tree[r["scenario"]][r["method"]][f"{r['shot']}shot"][r["calibration"]] = entry
    return json.loads(json.dumps(tree))


START = "start"  # a comparison's b: the method's own untrained start (resolved_start)


def start_of(results: list[dict], scenario: str, method: str, shot: int) -> str:
    """The baseline that is ``method``'s own start in this cell: the run's baseline built by the same
    initialisation (the ``init`` of its meta-model cards, which its meta-test results carry) and scored with the
    same learner, so that a change of ``metatrain.init`` or of the method's learner cannot make it wrong."""
    starts = {(r.get("init"), r.get("learner")) for r in results
              if (r["scenario"], r["method"], r["shot"]) == (scenario, method, shot)}
    if len(starts) != 1:
        raise ValueError(f"{scenario} {shot}-shot: the runs of {method} start from different initialisations: "
                         f"{sorted(starts, key=str)}")
    init, learner = starts.pop()
    if init is None:
        raise ValueError(f"{scenario} {shot}-shot: the meta-test results of {method} do not say where it started "
                         "(scored before results recorded their init): rerun its metatest jobs")
    for r in results:
        if ((r["scenario"], r["shot"]) == (scenario, shot) and r.get("baseline")
                and (r.get("init"), r.get("learner")) == (init, learner)):
            return r["method"]  # (absent under this calibration when plain-only: the comparison is not made)
    raise ValueError(f"{scenario} {shot}-shot: {method} starts from the {init} initialisation scored "
                     f"with {learner}, and no baseline of the run is that start: add the baseline that scores {init} "
                     f"with {learner} to metatest.baselines (e.g. {init}_{learner}) or drop the comparison")


def comparisons(results: list[dict], pairs: list[list[str]] | None = None, reference: str = REFERENCE_METHOD,
                alpha: float = ALPHA) -> list[dict]:
    """Method ``a`` minus method ``b`` for every ``[a, b]`` in ``pairs`` (the run's pre-registered
    comparisons; without them, ``reference`` minus every other method; ``b`` = ``start``: ``a``'s own start,
    :func:`start_of`), and ICFIL minus plain (and minus the ``steps`` control when present), paired on the same
    episodes, per scenario, shot and calibration, over training seeds where a run has enough
    (:mod:`dfml.replicates`).

    A pair that ``pairs`` names twice, e.g. ``[purer, average]`` and ``[purer, start]`` where PURER starts from the
    pool average, is one row (labelled ``average (start)``) and one test. Each row keeps the raw p-value
    ``p_value`` and ``p_holm``, Holm-adjusted over the family of all rows returned here (every distinct paired
    comparison of the run); ``significant`` is ``p_holm < alpha``."""
    by_key = group_seeds(results)
    if not pairs:
        pairs = [[reference, method] for method in sorted({r["method"] for r in results} - {reference},
                                                          key=method_sort_key)]
    rows = []
    for scenario, shot, calibration in sorted({(s, k, c) for s, _, k, c in by_key}):
        made = {}  # (a, b) -> its row: a pair listed twice (once as a method's start) is one test of the family
        for a, b in pairs:
            is_start = b == START and by_key.get((scenario, a, shot, calibration)) is not None
            if is_start:
                b = start_of(results, scenario, a, shot)
            ours, theirs = by_key.get((scenario, a, shot, calibration)), by_key.get((scenario, b, shot, calibration))
            if ours is None or theirs is None:
                continue
            if (a, b) not in made:
                made[a, b] = _comparison_row(scenario, shot, calibration, a, b, ours, theirs)
                rows.append(made[a, b])
            if is_start:
                made[a, b]["b"] = f"{b} (start)"
    for (scenario, method, shot, calibration), runs in sorted(by_key.items()):
        if calibration != "icfil":
            continue
        for control in ("plain", "steps"):  # steps: as many updates as ICFIL, without pseudo data
            other = by_key.get((scenario, method, shot, control))
            if other is not None:
                rows.append(_comparison_row(scenario, shot, f"icfil vs {control}", f"{method}+icfil",
                                            f"{method}+{control}" if control != "plain" else method, runs, other))
    raw = [row.pop("_p") for row in rows]  # unrounded, for the correction
    for row, p_holm in zip(rows, holm_adjust(raw)):
        row["p_holm"] = float(f"{p_holm:.3g}")
        row["significant"] = bool(p_holm < alpha)
    return rows


def episode_fingerprints(result: dict) -> dict[str, str]:
    return {name: d.get("episodes_sha256", "") for name, d in result.get("per_dataset", {}).items()}


def _comparison_row(scenario, shot, calibration, a_name, b_name, a: dict, b: dict) -> dict:
    """``a`` and ``b``: {training seed: result} of the two cells."""
    fingerprints = {json.dumps(episode_fingerprints(r), sort_keys=True) for r in [*a.values(), *b.values()]}
    if len(fingerprints) > 1:
        raise ValueError(f"{scenario} {shot}-shot: {a_name} and {b_name} were not scored on the same episodes; "
                         "a paired comparison is impossible (rerun their metatest jobs with the same settings)")
    diff = replicated_difference(a, b)
    # Column order of comparisons.csv; p_holm and significant are filled in by comparisons().
    return {"scenario": scenario, "shot": shot, "calibration": calibration, "a": a_name, "b": b_name,
            "difference": round(100 * diff.mean, 3), "ci95": round(100 * diff.ci95, 3),
            "p_value": float(f"{diff.p_value:.3g}"), "p_holm": None, "episodes": diff.episodes,
            "seeds": diff.seeds, "over": diff.unit,
            "ci_excludes_0": diff.excludes_zero, "significant": None, "_p": diff.p_value}


def accuracy_rows(results: list[dict]) -> list[dict]:
    return [{"run": f"{r['scenario']}/{r['method']}/{r['shot']}shot/{r['calibration']}", "scenario": r["scenario"],
             "method": r["method"], "shot": r["shot"], "calibration": r["calibration"], "seeds": r.get("seeds", 1),
             "ci_over": r.get("ci_over", "episodes"), "accuracy": round(100 * r["mean"], 3),
             "ci95": round(100 * r["ci95"], 3)}
            for r in sorted(results, key=run_key)]


def read_curve(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{protocol: [(iteration, meta-val accuracy %)]} from a curve.csv (its val_<protocol> columns)."""
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in (rows[0].keys() if rows else []) if c.startswith("val_")]
    return {c.removeprefix("val_"): [(int(r["iteration"]), round(100 * float(r[c]), 4)) for r in rows if r[c]]
            for c in columns}


def training_cost(path: str | Path) -> dict:
    """Meta-iterations and the wall time charged to the run's time budget: the warm start's (the row of
    iteration 0, for a method on the pseudo data; else None) plus the meta-iterations' (meta-val evaluations
    excluded), and, for a black-box method, the API queries used, from a curve.csv
    (results/metatrain/<scenario>/<method>/shot<k>/curve.csv)."""
    with open(path) as handle:
        every = list(csv.DictReader(handle))
    rows = [r for r in every if int(r["iteration"]) > 0]
    warm_start = [float(r["seconds"]) for r in every if int(r["iteration"]) == 0 and r["seconds"]]
    queries = [r["api_queries"] for r in rows if r.get("api_queries")]
    api_seconds = [r["api_seconds"] for r in rows if r.get("api_seconds")]
    return {**metatrain_run(path),
            "iterations": len(rows),
            "seconds": round(sum(warm_start) + sum(float(r["seconds"]) for r in rows if r["seconds"]), 1),
            "warm_start_seconds": round(warm_start[0], 1) if warm_start else None,
            "api_queries": int(float(queries[-1])) if queries else None,
            "api_seconds": round(float(api_seconds[-1]), 1) if api_seconds else None}


def seed_mean_costs(costs: list[dict]) -> list[dict]:
    """One cost per (scenario, method, shot): the mean over its training seeds of every number (iterations
    rounded), ``seeds`` their count; what the tables and the accuracy-against-time figure show."""
    groups = defaultdict(list)
    for c in costs:
        groups[(c["scenario"], c["method"], c["shot"])].append(c)
    merged = []
    for (scenario, method, shot), runs in sorted(groups.items()):
        mean = {"scenario": scenario, "method": method, "shot": shot, "seeds": len(runs)}
        for key in runs[0]:
            values = [r[key] for r in runs]
            if key not in mean and key != "training_seed" and all(isinstance(v, (int, float)) for v in values):
                mean[key] = round(sum(values) / len(values), 1)
            elif key not in mean and key != "training_seed":
                mean[key] = values[0] if len(set(map(str, values))) == 1 else None
        for key in ("iterations", "api_queries"):  # counts: a mean over seeds is shown as a whole number
            if isinstance(mean.get(key), float):
                mean[key] = round(mean[key])
        merged.append(mean)
    return merged


def base_scenario(scenario: str) -> str:
    """The scenario of a result name, without the ":<protocol>" that several protocols add (load_results)."""
    return scenario.split(":", 1)[0]


def leaderboard(results: list[dict], costs: list[dict] | None = None, reference: str = REFERENCE_METHOD,
                alpha: float = ALPHA) -> list[dict]:
    """One row per scenario, calibration and method: accuracy per shot, its paired difference to ``reference``
    on the same episodes (Holm-corrected over every difference of the leaderboard, its own family) and the
    method's meta-training cost per shot. Rows of a (scenario, calibration) are ranked by mean accuracy over
    shots; without ``reference`` in a scenario, no differences. Accuracies are seed means and differences are
    paired over training seeds where a run has enough of them (:mod:`dfml.replicates`)."""
    by_key = group_seeds(results)
    cost = {(c["scenario"], c["method"], c["shot"]): c for c in costs or []}
    rows, diffs = [], []
    for scenario, calibration in sorted({(s, c) for s, _, _, c in by_key},
                                        key=lambda sc: (sc[0], calibration_sort_key((0, sc[1])))):
        shots = sorted({k for s, _, k, c in by_key if (s, c) == (scenario, calibration)})
        methods = sorted({m for s, m, _, c in by_key if (s, c) == (scenario, calibration)}, key=method_sort_key)
        for method in methods:
            row = {"scenario": scenario, "calibration": calibration, "method": method, "shots": {}}
            for shot in shots:
                result = by_key.get((scenario, method, shot, calibration))
                ref = by_key.get((scenario, reference, shot, calibration))
                if result is None:
                    continue
                summary = summarise(result)
                cell = {"accuracy": round(100 * summary.mean, 3), "ci95": round(100 * summary.ci95, 3),
                        "seeds": summary.seeds, "ci_over": summary.ci_over,
                        "difference": None, "cost": cost.get((base_scenario(scenario), method, shot))}
                if ref is not None and method != reference:
                    cell["difference"] = _comparison_row(scenario, shot, calibration, method, reference, result, ref)
                    diffs.append(cell["difference"])
                row["shots"][shot] = cell
            accuracies = [cell["accuracy"] for cell in row["shots"].values()]
            row["mean_accuracy"] = sum(accuracies) / len(accuracies)
            rows.append(row)
    for diff, p_holm in zip(diffs, holm_adjust([d.pop("_p") for d in diffs])):
        diff["p_holm"], diff["significant"] = float(f"{p_holm:.3g}"), bool(p_holm < alpha)
    rows.sort(key=lambda r: (r["scenario"], calibration_sort_key((0, r["calibration"])), -r["mean_accuracy"]))
    return rows


def leaderboard_markdown(rows: list[dict], reference: str = REFERENCE_METHOD) -> list[str]:
    """summary.md's leaderboard: a table per scenario and calibration, best first."""
    if not rows:
        return []
    n = sum(cell["difference"] is not None for r in rows for cell in r["shots"].values())
    lines = ["## Leaderboard", "",
             f"Per scenario and calibration, methods ranked by accuracy (%, mean over shots; a cell is the mean over "
             f"its training seeds, its CI over the seeds with {MIN_SEEDS} or more, else over the episodes), each with "
             f"its paired difference to {reference} on the same episodes (over the seeds likewise; * significant, Holm "
             f"over the {n} differences of this table) and its meta-training cost (the wall time charged to its budget: the meta-iterations, and "
             "the warm-start inversion for a method on its pseudo data; API queries for black-box methods; - for "
             "untrained references).", ""]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r["calibration"])].append(r)
    for (scenario, calibration), members in groups.items():
        shots = sorted({k for r in members for k in r["shots"]})
        lines += [f"### {scenario}, {calibration}", "",
                  "| rank | method | " + " | ".join(f"{k}-shot | vs {reference}" for k in shots) +
                  " | time (s) | API queries |", "|---|---|" + "---|---|" * len(shots) + "---|---|"]
        for rank, r in enumerate(members, start=1):
            cells, times, queries = [], [], []
            for k in shots:
                cell = r["shots"].get(k)
                if cell is None:
                    cells += ["n/a", ""]
                    continue
                d = cell["difference"]
                star = "*" if d is not None and d["significant"] else ""
                cells += [accuracy_text(cell["accuracy"], cell["ci95"]),
                          "-" if d is None else f"{d['difference']:+.2f} +- {d['ci95']:.2f}{star}"]
                c = cell["cost"]
                times.append("-" if c is None else f"{c['seconds']:.0f}")
                queries.append("-" if c is None or not c.get("api_queries") else f"{c['api_queries']:,}")
            time_cell = " / ".join(times) if any(t != "-" for t in times) else "-"
            query_cell = " / ".join(queries) if any(q != "-" for q in queries) else "-"
            lines.append(f"| {rank} | {r['method']} | " + " | ".join(cells) + f" | {time_cell} | {query_cell} |")
        lines.append("")
    return lines


def cost_markdown(costs: list[dict]) -> list[str]:
    lines = ["## Meta-training cost", "",
             "Wall time charged to each run's time budget: its meta-iterations (meta-val evaluations excluded) and, "
             "for a method that starts from the warm-start pseudo data (PURER, its EI ablation), the warm-start "
             "inversion's, charged in full to each of them (its own column too); and the black-box queries a "
             "method sent to the pool's APIs, with the time the APIs took to answer.", "",
             "| scenario | method | shot | iterations | warm start (s) | time (s) | API queries | API time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in sorted(costs, key=lambda c: (c["scenario"], method_sort_key(c["method"]), c["shot"])):
        queries = "-" if c["api_queries"] is None else f"{c['api_queries']:,}"
        api_time = "-" if c.get("api_seconds") is None else f"{c['api_seconds']:.1f}"
        warm_start = "-" if c.get("warm_start_seconds") is None else f"{c['warm_start_seconds']:.1f}"
        lines.append(f"| {c['scenario']} | {c['method']} | {c['shot']} | {c['iterations']} | {warm_start} | "
                     f"{c['seconds']:.1f} | {queries} | {api_time} |")
    return lines + [""]


def curve_rows(curves: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """Wide table: one row per evaluated iteration, one column per run (blank where not evaluated)."""
    iterations = sorted({it for points in curves.values() for it, _ in points})
    lookup = {name: dict(points) for name, points in curves.items()}
    return [{"iteration": it, **{name: lookup[name].get(it, "") for name in curves}} for it in iterations]


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    fields = list(rows[0])
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_markdown(results: list[dict], comparison_rows: list[dict], reproduce: str,
                     costs: list[dict] | None = None, sections: list[str] | None = None) -> str:
    """summary.md: accuracy tables, paired differences, ``sections`` (further markdown lines, e.g. the attack
    study's, see :mod:`dfml.studies.attack`) and the training cost."""
    lines = ["# dfml results", "", "5-way accuracy (%) on the fixed meta-test episodes, mean +- 95% CI "
             "(t_0.975,n-1 * s / sqrt(n), s the sample std over the CI's unit: training seeds, or episodes); "
             "models selected on meta-val only.", "", variance_note(results), ""]
    lines += leaderboard_markdown(leaderboard(results, costs))
    by_scenario = defaultdict(list)
    for r in aggregate(results):
        by_scenario[r["scenario"]].append(r)
    for scenario, rows in sorted(by_scenario.items()):
        columns = sorted({(r["shot"], r["calibration"]) for r in rows}, key=calibration_sort_key)
        table = {(r["method"], r["shot"], r["calibration"]): r for r in rows}
        episodes = sorted({r["episodes"] for r in rows})
        lines += [f"## Scenario {scenario} ({', '.join(map(str, episodes))} episodes per dataset)", "",
                  "| method | " + " | ".join(f"{s}-shot {c}" for s, c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for method in sorted({r["method"] for r in rows}, key=method_sort_key):
            cells = [_cell(table.get((method, s, c))) for s, c in columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if comparison_rows:
        m = len(comparison_rows)
        lines += ["## Paired differences (same episodes)", "",
                  "A - B +- 95% CI and the two-sided paired t-test p, both from Student's t with n - 1 dof, n the "
                  "training seeds (differences of the seed means, paired by seed) or, with fewer than "
                  f"{MIN_SEEDS} seeds, the episodes (column `over`; the CI excludes 0 exactly when p < 0.05). "
                  f"**Multiple comparisons:** p (Holm) and significant are Holm-corrected over the family of all "
                  f"{m} paired comparison{'s' if m != 1 else ''} of this run (every row below), "
                  f"family-wise alpha = {ALPHA:g}.", "",
                  "| scenario | shot | calibration | A | B | A - B | 95% CI | over | p | p (Holm) | significant (Holm) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in comparison_rows:
            lines.append(f"| {c['scenario']} | {c['shot']} | {c['calibration']} | {c['a']} | {c['b']} | "
                         f"{c['difference']:+.2f} | {c['ci95']:.2f} | {c['seeds']} seed{'s' if c['seeds'] != 1 else ''}"
                         f"{'' if c['over'] == 'seeds' else ', episodes'} | {c['p_value']:.3g} | {c['p_holm']:.3g} | "
                         f"{'yes' if c['significant'] else 'no'} |")
        lines.append("")
    lines += sections or []
    if costs:
        lines += cost_markdown(costs)
    lines += ["Reproduce: `" + reproduce + "`", ""]
    return "\n".join(lines)


def accuracy_text(accuracy: float, ci95: float) -> str:
    """A table cell: accuracy and its 95% CI, both in percent."""
    return f"{accuracy:.2f} +- {ci95:.2f}"


def _cell(result: dict | None) -> str:
    return "n/a" if result is None else accuracy_text(100 * result["mean"], 100 * result["ci95"])


LINE_STYLES = ("-", "--", ":", "-.")


def plot_accuracy(results: list[dict], path: Path, colours: dict[str, tuple] | None = None) -> Figure:
    """One panel per scenario, bars per method grouped by (shot, calibration); one legend for the figure."""
    scenarios = sorted({r["scenario"] for r in results})
    colours = colours or method_colours(r["method"] for r in results)
    figure = Figure(figsize=(4.2 * len(scenarios) + 1.3, 3.6), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(scenarios), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        rows = [r for r in results if r["scenario"] == scenario]
        groups = sorted({(r["shot"], r["calibration"]) for r in rows}, key=lambda c: (c[0], c[1] != "plain"))
        methods = sorted({r["method"] for r in rows}, key=method_sort_key)
        width = 0.8 / len(methods)
        table = {(r["method"], r["shot"], r["calibration"]): r for r in rows}
        for m, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for g, (shot, calibration) in enumerate(groups):
                r = table.get((method, shot, calibration))
                if r is not None:
                    xs.append(g + (m - (len(methods) - 1) / 2) * width)
                    ys.append(100 * r["mean"])
                    errs.append(100 * r["ci95"] if math.isfinite(r["ci95"]) else math.nan)  # nan: no error bar
            ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colours[method], label=method)
        ax.set_xticks(range(len(groups)), [f"{s}-shot\n{c}" for s, c in groups], fontsize=8)
        ax.axhline(100 / 5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"scenario {scenario}")
        ax.set_ylabel("accuracy (%)")
    present = sorted({r["method"] for r in results}, key=method_sort_key)
    if present:
        figure.legend(handles=[Patch(facecolor=colours[m], label=m) for m in present], loc="outside right upper",
                      fontsize=8, title="method", title_fontsize=8)
    figure.savefig(path)
    return figure


def plot_accuracy_vs_time(results: list[dict], costs: list[dict], path: Path,
                          colours: dict[str, tuple] | None = None) -> Figure:
    """Plain meta-test accuracy against meta-training wall time (what its budget was charged:
    :func:`training_cost`'s seconds, the warm start included for a method on its pseudo data), so that
    "better" and "cheaper" are read together: one panel per scenario, one point per trained method and shot
    (marker = shot; the time axis log where the costs span more than a factor of 10), black-box methods' API
    queries written beside their point; untrained references (no cost) as dotted horizontal lines."""
    plain = {(r["scenario"], r["method"], r["shot"]): r for r in results if r["calibration"] == "plain"}
    cost = {(c["scenario"], c["method"], c["shot"]): c for c in costs}
    scenarios = sorted({key[0] for key in plain})
    shots = sorted({key[2] for key in plain})
    markers = dict(zip(shots, "os^Dv"))
    colours = colours or method_colours(r["method"] for r in results)
    figure = Figure(figsize=(4.2 * max(1, len(scenarios)) + 1.3, 3.6), dpi=110, layout="constrained")
    axes = figure.subplots(1, max(1, len(scenarios)), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        for (s, method, shot), r in sorted(plain.items(), key=lambda kv: method_sort_key(kv[0][1])):
            if s != scenario:
                continue
            c = cost.get((base_scenario(s), method, shot))
            if c is None:  # an untrained reference
                ax.axhline(100 * r["mean"], color=colours[method], ls=":", lw=1)
                continue
            ax.errorbar(max(c["seconds"], 1e-3), 100 * r["mean"], yerr=100 * r["ci95"], color=colours[method],
                        marker=markers[shot], capsize=2, ls="none")
            if c.get("api_queries"):
                ax.annotate(f"{c['api_queries'] / 1e6:.2g} M queries", (c["seconds"], 100 * r["mean"]), fontsize=6,
                            xytext=(4, 4), textcoords="offset points")
        times = [c["seconds"] for (s, _, _), c in cost.items() if s == base_scenario(scenario) and c["seconds"] > 0]
        if times and max(times) > 10 * min(times):  # log only where costs span orders of magnitude
            ax.set_xscale("log")
        ax.set_title(f"scenario {scenario}")
        ax.set_xlabel("meta-training time, warm start included (s)")
        ax.set_ylabel("accuracy (%), plain")
    methods = sorted({key[1] for key in plain}, key=method_sort_key)
    handles = [Patch(facecolor=colours[m], label=m) for m in methods]
    handles += [Line2D([], [], color="0.3", marker=markers[k], ls="none", label=f"{k}-shot") for k in shots]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.savefig(path)
    return figure


def curve_parts(name: str) -> tuple[str, str, str]:
    """Split a curve name "<scenario>/<method>/<k>shot[@seed<t>]" into (scenario, method, "<k>shot"): a
    method's seeds share its colour and line style."""
    scenario, method, shot = name.split("/", 2)
    return scenario, method, shot.split("@", 1)[0]


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path,
                colours: dict[str, tuple] | None = None) -> Figure:
    """One panel per scenario; colour = method (as in the accuracy figure), line style = shot; one legend."""
    drawn = {name: points for name, points in curves.items() if points}
    scenarios = sorted({curve_parts(name)[0] for name in drawn})
    methods = sorted({curve_parts(name)[1] for name in drawn}, key=method_sort_key)
    shots = sorted({curve_parts(name)[2] for name in drawn}, key=lambda k: (len(k), k))  # 5shot before 10shot
    colours = colours or method_colours(methods)
    styles = {shot: LINE_STYLES[i % len(LINE_STYLES)] for i, shot in enumerate(shots)}
    figure = Figure(figsize=(4.2 * max(1, len(scenarios)) + 1.3, 3.4), dpi=110, layout="constrained")
    axes = figure.subplots(1, max(1, len(scenarios)), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios):
        for method in methods:
            for shot in shots:
                for name, points in drawn.items():
                    if curve_parts(name) == (scenario, method, shot):
                        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color=colours[method],
                                ls=styles[shot], label=f"{method}/{shot}")
        ax.set_title(f"meta-val accuracy, {scenario}")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=colours[m], lw=2, label=m) for m in methods]
    handles += [Line2D([], [], color="0.3", ls=styles[k], label=k.replace("shot", "-shot")) for k in shots]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.savefig(path)
    return figure


def run_colours(results: list[dict], curves: dict[str, list[tuple[int, float]]]) -> dict[str, tuple]:
    """:func:`method_colours` over every method of the run's results and curves (every figure uses these)."""
    return method_colours([r["method"] for r in results] + [curve_parts(name)[1] for name in curves])


def write_report(results: list[dict], curves: dict[str, list[tuple[int, float]]], out_dir: Path,
                 metrics_path: Path, reproduce: str, pairs: list[list[str]] | None = None,
                 costs: list[dict] | None = None, sections: list[str] | None = None) -> dict:
    """Write metrics.json, plots/*.csv, plots/*.png and summary.md from the meta-test ``results`` (one per
    training seed of a cell, see :mod:`dfml.replicates`); return the comparisons (``pairs``:
    the pre-registered ones, see :func:`comparisons`; ``costs``: :func:`training_cost` of each run;
    ``sections``: further markdown lines for summary.md)."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    comparison_rows = comparisons(results, pairs)
    costs = seed_mean_costs(costs) if costs else costs
    cells = aggregate(results)  # one per (scenario, method, shot, calibration): the seed mean and its CI
    colours = run_colours(results, curves)
    atomic_write_text(metrics_path, json.dumps(metrics(cells), indent=2, sort_keys=True) + "\n")
    atomic_write_text(plots / "accuracy.csv", to_csv(accuracy_rows(cells)))
    atomic_write_text(plots / "metaval_curves.csv", to_csv(curve_rows(curves)))
    atomic_write_text(plots / "comparisons.csv", to_csv(comparison_rows))
    plot_accuracy(cells, plots / "accuracy.png", colours)
    plot_curves(curves, plots / "metaval_curves.png", colours)
    if costs:
        plot_accuracy_vs_time(cells, costs, plots / "accuracy_vs_time.png", colours)
    atomic_write_text(out_dir / "summary.md", summary_markdown(results, comparison_rows, reproduce, costs, sections))
    return {"comparisons": comparison_rows}
