"""Compare a finished run with recorded results, cell by cell: identical (bit for bit: same code, seeds and
machine type), within the recorded spread (elsewhere), or outside / missing, naming those cells
(dfml/replication.py says how). Exit status 1 when a cell is outside or missing.

  python tools/replicate.py --run results/metrics.json --recorded docs/benchmark_results/ss.json
  python tools/replicate.py --result results/metatest/ss/purer/seed0/test1/shot1_*.json \
      --recorded docs/benchmark_results/ss.json      # a replay of one seed's cells (configs/benchmark_pins/ss_seed0.yaml)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfml.replication import check_results, compare, markdown


def read_json(path: Path, option: str, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{option} {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{option} {path}: not {what} ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--run", type=Path, default=Path("results/metrics.json"), help="the finished run's metrics")
    run.add_argument("--result", type=Path, nargs="+", help="meta-test result files of a replay (one seed's cells)")
    parser.add_argument("--recorded", type=Path, required=True, help="the recorded metrics.json to compare with")
    args = parser.parse_args(argv)
    recorded = read_json(args.recorded, "--recorded", "a metrics.json")
    if args.result:
        checks = check_results([read_json(path, "--result", "a meta-test result") for path in args.result], recorded)
    else:
        checks = compare(read_json(args.run, "--run", "a metrics.json"), recorded)
    print("\n".join(markdown(checks)))
    return int(any(c.verdict in ("outside", "missing") for c in checks))


if __name__ == "__main__":
    sys.exit(main())
