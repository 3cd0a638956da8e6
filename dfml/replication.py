"""Compare a finished run with recorded results, cell by cell (tools/replicate.py).

Both sides are metrics.json trees (dfml.report.metrics): {scenario: {method: {"<k>shot": {calibration: cell}}}}.
A cell of the run is

* ``identical`` when its ``sha256`` (every per-episode accuracy of every seed, exactly) equals the recorded one:
  the same code, seeds and machine type repeat a run bit for bit;
* ``within`` when it is not identical but its mean lies within the recorded spread: the recorded mean
  +- sqrt(2) x the recorded 95% CI (the interval of a difference of two independent means of equal spread), the
  CI being over the recorded training seeds where it has 3 or more (so it holds what another machine's
  arithmetic moves), else over episodes only (a one-seed record cannot say how far training moves it, and the
  row says so);
* ``outside`` otherwise, or ``missing`` on either side.

A replay of one training seed (a pin file replays one seed, and one meta-test result file is one seed's run of a
cell) is checked with :func:`check_results`: ``identical`` when its per-episode accuracies fingerprint as the
recorded cell's run of that seed (``per_seed_sha256``), else within / outside as above.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from dfml.replicates import episodes_sha256, seed_of

VERDICTS = ("identical", "within", "outside", "missing")


@dataclass(frozen=True)
class CellCheck:
    cell: str
    verdict: str
    run: float | None
    recorded: float | None
    allowed: float | None  # half-width of the accepted interval around the recorded mean (points)
    over: str | None  # what the recorded CI goes over: seeds or episodes


def cells(tree: dict) -> dict[str, dict]:
    """{"scenario/method/<k>shot/calibration": cell} of a metrics.json tree."""
    return {f"{s}/{m}/{k}/{c}": cell for s, methods in tree.items() for m, shots in methods.items()
            for k, calibrations in shots.items() for c, cell in calibrations.items()}


def check_cell(name: str, run: dict | None, recorded: dict | None) -> CellCheck:
    if run is None or recorded is None:
        return CellCheck(name, "missing", run and run["accuracy"], recorded and recorded["accuracy"], None, None)
    over = recorded.get("ci_over", "episodes")
    allowed = math.sqrt(2) * recorded["ci95"] if recorded.get("ci95") is not None else math.inf
    if run.get("sha256") and run.get("sha256") == recorded.get("sha256"):
        verdict = "identical"
    elif abs(run["accuracy"] - recorded["accuracy"]) <= allowed:
        verdict = "within"
    else:
        verdict = "outside"
    return CellCheck(name, verdict, run["accuracy"], recorded["accuracy"], allowed, over)


def compare(run: dict, recorded: dict) -> list[CellCheck]:
    """Every cell of either side, checked (sorted by name)."""
    ours, theirs = cells(run), cells(recorded)
    return [check_cell(name, ours.get(name), theirs.get(name)) for name in sorted(set(ours) | set(theirs))]


def check_results(results: list[dict], recorded: dict) -> list[CellCheck]:
    """Meta-test result files (each one seed's run of a cell) against a recorded metrics.json, in the given order."""
    theirs = cells(recorded)
    checks = []
    for r in results:
        scenario = f"{r['scenario']}:{r['protocol']}"
        if scenario not in recorded:
            scenario = r["scenario"]  # a record of one protocol names scenarios alone (dfml.report.load_results)
        seed = seed_of(r)
        name = f"{scenario}/{r['method']}/{r['shot']}shot/{r['calibration']}"
        cell = theirs.get(name)
        fingerprint = (cell or {}).get("per_seed_sha256", {}).get(str(seed))
        mine = {"accuracy": round(100 * r["mean"], 3),
                "sha256": fingerprint if fingerprint == episodes_sha256({seed: r}) else None}
        checks.append(check_cell(f"{name} (training seed {seed})", mine, cell and {**cell, "sha256": fingerprint}))
    return checks


def distances(checks: list[CellCheck]) -> list[str]:
    """Per calibration, how far the run's means lie from the recorded ones: median and largest |run - recorded|
    over the cells both sides have (what a second seed set or another machine moves a cell by)."""
    by_calibration: dict[str, list[tuple[float, str]]] = {}
    for c in checks:
        if c.run is not None and c.recorded is not None:
            calibration = c.cell.split(" ")[0].rsplit("/", 1)[1]  # a replay's cell name ends "(training seed t)"
            by_calibration.setdefault(calibration, []).append((abs(c.run - c.recorded), c.cell))
    lines = []
    for calibration, gaps in sorted(by_calibration.items()):
        median = statistics.median(gap for gap, _ in gaps)
        gap, cell = max(gaps)
        largest = f"{gap:.2f} ({cell})" if gap else "0.00"
        lines.append(f"{calibration}: |run - recorded| median {median:.2f}, largest {largest} over {len(gaps)} cells")
    return lines


def markdown(checks: list[CellCheck]) -> list[str]:
    """One summary line, the distances per calibration, and a table of the cells that are not identical."""
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    lines = [", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" of {len(checks)} cells"]
    lines += [f"- {line}" for line in distances(checks)]
    rest = [c for c in checks if c.verdict != "identical"]
    if rest:
        lines += ["", "| cell | verdict | run | recorded | accepted +- | recorded CI over |", "|---|---|---|---|---|---|"]
        for c in rest:
            value = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {c.cell} | {c.verdict} | {value(c.run)} | {value(c.recorded)} | {value(c.allowed)} | "
                         f"{c.over or '-'}{' (one seed: training variance not included)' if c.over == 'episodes' else ''} |")
    return lines
