"""FREE's speed claim on a toy or a pipeline pool: the command of the recovery study (dfml/studies/recovery.py,
whose docstring says what is measured).

    .venv/bin/python tools/bench_recovery.py --out results/bench_recovery     # bench.json, bench.png, bench.md
    .venv/bin/python tools/bench_recovery.py --pool results/pool/cifarfs_ss --out results/bench_recovery_cifarfs
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse

from dfml.studies import recovery


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=recovery.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_recovery", help="directory for bench.json/.png/.md")
    parser.add_argument("--pool", default=None, metavar="DIR",
                        help="real members: a pipeline pool directory (results/pool/<scenario>); its first member "
                             "is the held-out teacher, the others meta-train the generator (default: the toy)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--train-teachers", type=int, default=6, help="toy teachers meta-training the generator")
    parser.add_argument("--meta-events", type=int, default=60, help="meta-training events (4 teachers each)")
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--free-steps", type=int, default=5)
    parser.add_argument("--scratch-steps", type=int, default=200)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--generator-width", type=int, default=32)
    parser.add_argument("--target-accuracy", type=float, default=0.95)
    parser.add_argument("--target-loss", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summarise", action="store_true",
                        help="rewrite bench.md/.png/.json from the curves of --out's bench.json, measure nothing")
    return parser


def main(args: argparse.Namespace) -> int:
    return recovery.run(args)


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
