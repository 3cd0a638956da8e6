"""Add each training seed's fingerprint (``per_seed_sha256``) to a recorded metrics.json written before the report
wrote them, from the run's meta-test result files: only after those files recompute every recorded cell's
fingerprint (``sha256``) exactly, so the added ones are the recorded run's. A one-seed replay can then be checked
bit for bit (tools/replicate.py --result).

  python tools/seed_fingerprints.py --results ../bench/results/metatest/ss --record docs/benchmark_results/ss.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfml.replicates import aggregate
from dfml.replication import cells
from dfml.report import load_results


def add_seed_fingerprints(record: dict, results: list[dict]) -> int:
    """Fill ``per_seed_sha256`` into every cell of ``record`` (in place); the number of cells. Refuses, naming the
    cell, a recorded cell the results do not have or whose fingerprint they do not recompute."""
    ours = {"/".join((c["scenario"], c["method"], f"{c['shot']}shot", c["calibration"])): c for c in aggregate(results)}
    recorded = cells(record)  # the record's own entries: filled in place
    for name, entry in recorded.items():
        cell = ours.get(name)
        if cell is None:
            raise SystemExit(f"{name}: no result file for this recorded cell")
        if cell["sha256"] != entry.get("sha256"):
            raise SystemExit(f"{name}: the result files do not recompute the recorded fingerprint")
        entry["per_seed_sha256"] = cell["per_seed_sha256"]
    return len(recorded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="the run's results/metatest/<scenario> folder")
    parser.add_argument("--record", type=Path, required=True, help="the recorded metrics.json, rewritten in place")
    args = parser.parse_args(argv)
    paths = sorted(args.results.rglob("*.json"))
    if not paths:
        raise SystemExit(f"--results {args.results}: no meta-test result files")
    record = json.loads(args.record.read_text())
    count = add_seed_fingerprints(record, load_results(paths))
    args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.record}: per-seed fingerprints of {count} cells from {len(paths)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
