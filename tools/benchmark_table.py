"""A benchmark run as README tables.

One scenario: a row per method (ranked by 1-step plain accuracy, mean over shots), its accuracy (%, mean +- 95%
CI) plain and with ICFIL under the 1-step protocol, plain under the 10-step one, and the meta-iterations each
shot's run reached in its time budget; with --published, the papers' numbers for the scenario beside them
(docs/benchmark_results/published.yaml). The overview: every scenario of the given metrics files side by side,
1-step plain accuracy as "1-shot / 5-shot" (seed means; a column's heading names its training seeds when it has
several), methods ranked by their mean over the cells they have. The
comparisons: a run's pre-registered paired differences (its results/plots/comparisons.csv) as "1-shot / 5-shot"
per column, bold where significant after Holm, and the range of ICFIL's gain over plain.

  python tools/benchmark_table.py --scenario ss          # after a run of configs/benchmark.yaml
  python tools/benchmark_table.py --scenario cifarfs_ss --published docs/benchmark_results/published.yaml
  python tools/benchmark_table.py --overview --metrics docs/benchmark_results/{ss,sh,mh}.json   # columns in this order
  python tools/benchmark_table.py --comparisons docs/benchmark_results/omniglot_ss_comparisons.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from dfml.report import accuracy_text, training_cost

COLUMNS = [("test1", "plain", "{k}-shot"), ("test1", "icfil", "{k}-shot ICFIL"), ("test10", "plain", "{k}-shot, 10 steps")]



def iterations_reached(curves: list[Path]) -> str:
    """The meta-iterations a run reached, averaged over its training seeds' curves (rounded)."""
    return str(round(sum(training_cost(c)["iterations"] for c in curves) / len(curves)))

def cell(metrics: dict, scenario: str, protocol: str, method: str, shot: int, calibration: str) -> str:
    entry = metrics.get(f"{scenario}:{protocol}", {}).get(method, {}).get(f"{shot}shot", {}).get(calibration)
    return "-" if entry is None else accuracy_text(entry["accuracy"], entry["ci95"])


def published_numbers(path: Path, scenario: str) -> dict:
    """{method: row} for ``scenario`` from a published-numbers file; each row's "<k>shot" is [mean, ci95]."""
    table = yaml.safe_load(path.read_text()) or {}
    if scenario not in table:
        raise SystemExit(f"{path} has no published numbers for {scenario} (it has: {', '.join(table) or 'none'})")
    for method, row in table[scenario].items():
        for key, value in row.items():
            if key.endswith("shot") and not (isinstance(value, list) and len(value) == 2):
                raise SystemExit(f"{path}: {scenario}.{method}.{key} must be [mean, ci95], not {value!r}")
    return table[scenario]


def published_cell(row: dict | None, shots) -> str:
    if not row:
        return "-"
    means = [f"{row[f'{k}shot'][0]:.2f}" if f"{k}shot" in row else "-" for k in shots]
    return " / ".join(means) + (f" {row['mark']}" if row.get("mark") else "")


def benchmark_table(metrics: dict, scenario: str, metatrain_root: Path, shots=(1, 5),
                    published: dict | None = None) -> list[str]:
    plain = metrics.get(f"{scenario}:test1")
    if not plain:
        raise SystemExit(f"no results for {scenario}:test1 in the metrics (protocols test1 and test10 expected)")

    def rank(method: str) -> float:
        scores = [plain[method][f"{k}shot"]["plain"]["accuracy"] for k in shots if f"{k}shot" in plain[method]]
        return -sum(scores) / len(scores)

    header = [c.format(k=k) for _, _, c in COLUMNS for k in shots] + ["iterations"]
    if published is not None:
        header.append("paper " + " / ".join(f"{k}-shot" for k in shots))
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for method in sorted(plain, key=rank):
        cells = [cell(metrics, scenario, p, method, k, c) for p, c, _ in COLUMNS for k in shots]
        per_shot = [sorted((metatrain_root / scenario / method).glob(f"seed*/shot{k}/curve.csv")) for k in shots]
        reached = " / ".join(iterations_reached(curves) for curves in per_shot) if all(per_shot) else "-"
        cells.append(reached)
        if published is not None:
            cells.append(published_cell(published.get(method), shots))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def overview_table(metrics: dict, shots=(1, 5)) -> list[str]:
    scenarios = list(dict.fromkeys(key.split(":")[0] for key in metrics if key.endswith(":test1")))
    if not scenarios:
        raise SystemExit("no 1-step (test1) results in the metrics")

    def plain(scenario: str, method: str) -> list[float]:
        entry = metrics[f"{scenario}:test1"].get(method, {})
        return [entry[f"{k}shot"]["plain"]["accuracy"] for k in shots if f"{k}shot" in entry]

    def heading(scenario: str) -> str:
        seeds = max(shot.get("plain", {}).get("seeds", 1) for row in metrics[f"{scenario}:test1"].values()
                    for shot in row.values())
        return f"{scenario} ({seeds} seeds)" if seeds > 1 else scenario

    methods = list(dict.fromkeys(m for s in scenarios for m in metrics[f"{s}:test1"]))
    scores = {m: [a for s in scenarios for a in plain(s, m)] for m in methods}
    shot_names = " / ".join(f"{k}-shot" for k in shots)
    lines = [f"| method ({shot_names}) | " + " | ".join(map(heading, scenarios)) + " |",
             "|---|" + "---|" * len(scenarios)]
    for method in sorted(methods, key=lambda m: -sum(scores[m]) / len(scores[m])):
        cells = [" / ".join(f"{a:.1f}" for a in plain(s, method)) or "-" for s in scenarios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


COMPARISON_COLUMNS = [("test1", "plain", "plain"), ("test1", "icfil", "ICFIL"), ("test10", "plain", "10 steps")]
ICFIL_GAIN = "icfil vs plain"


def signed(row: dict) -> str:
    text = f"{float(row['difference']):+.2f}"
    return f"**{text}**" if row["significant"] == "True" else text


def comparisons_table(rows: list[dict], shots=(1, 5)) -> list[str]:
    """The pre-registered pairs in the report's order, then ICFIL's gain over plain as a range."""
    if not rows:
        raise SystemExit("the comparisons file has no rows")
    index = {(r["scenario"].split(":")[-1], r["calibration"], r["a"], r["b"], int(r["shot"])): r for r in rows}
    plain_first = sorted((r for r in rows if not r["calibration"].startswith("icfil vs")),
                         key=lambda r: r["calibration"] != "plain")  # every pair has plain rows; ICFIL not all
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in plain_first))
    lines = ["| comparison | " + " | ".join(name for _, _, name in COMPARISON_COLUMNS) + " |",
             "|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for a, b in pairs:
        cells = []
        for protocol, calibration, _ in COMPARISON_COLUMNS:
            found = [index.get((protocol, calibration, a, b, k)) for k in shots]
            cells.append(" / ".join(signed(r) if r else "-" for r in found) if any(found) else "")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    gains = [r for r in rows if r["calibration"] == ICFIL_GAIN]
    if gains:
        values = sorted(float(r["difference"]) for r in gains)
        held = sum(r["significant"] == "True" for r in gains)
        lines += ["", f"ICFIL against plain: {values[0]:+.1f} to {values[-1]:+.1f} points over {len(gains)} "
                      f"method-shot cells, {held} significant."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--scenario")
    target.add_argument("--overview", action="store_true", help="every scenario of the metrics files side by side")
    target.add_argument("--comparisons", type=Path, metavar="CSV", help="a run's results/plots/comparisons.csv")
    parser.add_argument("--metrics", type=Path, nargs="+", default=[Path("results/metrics.json")],
                        help="metrics files of runs (the overview merges them; a scenario's table reads the first)")
    parser.add_argument("--metatrain", type=Path, default=Path("results/metatrain"))
    parser.add_argument("--published", type=Path, help="a column of the papers' numbers for --scenario "
                        "(docs/benchmark_results/published.yaml)")
    args = parser.parse_args(argv)
    if args.comparisons:
        with args.comparisons.open(newline="") as handle:
            print("\n".join(comparisons_table(list(csv.DictReader(handle)))))
        return 0
    runs = [json.loads(path.read_text()) for path in args.metrics]
    if args.overview:
        print("\n".join(overview_table({key: table for run in runs for key, table in run.items()})))
    else:
        published = published_numbers(args.published, args.scenario) if args.published else None
        print("\n".join(benchmark_table(runs[0], args.scenario, args.metatrain, published=published)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
