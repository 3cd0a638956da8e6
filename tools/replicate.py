"""Compare a finished run with recorded results, cell by cell: identical (bit for bit: same code, seeds and
machine type), within the recorded spread (elsewhere), or outside / missing, naming those cells
(dfml/replication.py says how). Exit status 1 when a cell is outside or missing.

  python tools/replicate.py --run results/metrics.json --recorded docs/benchmark_results/ss.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfml.replication import compare, markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("results/metrics.json"), help="the finished run's metrics")
    parser.add_argument("--recorded", type=Path, required=True, help="the recorded metrics.json to compare with")
    args = parser.parse_args(argv)
    trees = {}
    for name in ("run", "recorded"):
        path = getattr(args, name)
        try:
            trees[name] = json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"--{name} {path}: no such file") from None
        except json.JSONDecodeError as err:
            raise SystemExit(f"--{name} {path}: not a metrics.json ({err})") from None
    checks = compare(trees["run"], trees["recorded"])
    print("\n".join(markdown(checks)))
    return int(any(c.verdict in ("outside", "missing") for c in checks))


if __name__ == "__main__":
    sys.exit(main())
