"""One scenario of a benchmark run as a README table: a row per method (ranked by 1-step plain accuracy, mean
over shots), its accuracy (%, mean +- 95% CI) plain and with ICFIL under the 1-step protocol, plain under the
10-step one, and the meta-iterations each shot's run reached in its time budget.

  python scripts/benchmark_table.py --scenario ss          # after a run of configs/benchmark.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfml.report import accuracy_text, training_cost

COLUMNS = [("test1", "plain", "{k}-shot"), ("test1", "icfil", "{k}-shot ICFIL"), ("test10", "plain", "{k}-shot, 10 steps")]


def cell(metrics: dict, scenario: str, protocol: str, method: str, shot: int, calibration: str) -> str:
    entry = metrics.get(f"{scenario}:{protocol}", {}).get(method, {}).get(f"{shot}shot", {}).get(calibration)
    return "-" if entry is None else accuracy_text(entry["accuracy"], entry["ci95"])


def benchmark_table(metrics: dict, scenario: str, metatrain_root: Path, shots=(1, 5)) -> list[str]:
    plain = metrics.get(f"{scenario}:test1")
    if not plain:
        raise SystemExit(f"no results for {scenario}:test1 in the metrics (protocols test1 and test10 expected)")

    def rank(method: str) -> float:
        scores = [plain[method][f"{k}shot"]["plain"]["accuracy"] for k in shots if f"{k}shot" in plain[method]]
        return -sum(scores) / len(scores)

    header = [c.format(k=k) for _, _, c in COLUMNS for k in shots]
    lines = ["| method | " + " | ".join(header) + " | iterations |", "|---|" + "---|" * (len(header) + 1)]
    for method in sorted(plain, key=rank):
        cells = [cell(metrics, scenario, p, method, k, c) for p, c, _ in COLUMNS for k in shots]
        curves = [metatrain_root / scenario / method / f"shot{k}" / "curve.csv" for k in shots]
        reached = " / ".join(str(training_cost(c)["iterations"]) for c in curves) if curves[0].exists() else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {reached} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--metrics", type=Path, default=Path("results/metrics.json"))
    parser.add_argument("--metatrain", type=Path, default=Path("results/metatrain"))
    args = parser.parse_args(argv)
    print("\n".join(benchmark_table(json.loads(args.metrics.read_text()), args.scenario, args.metatrain)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
