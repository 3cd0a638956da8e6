"""Table: how each meta-training run moved its pseudo dataset (see dfml/studies/diagnostics.py).

    python tools/pseudo_drift.py --scenario ss            # every method and shot found under results/

Columns: adversarial steps taken; the pool's BN-matching term at the first and last iteration; the
median / 99th percentile over pseudo images of the mean absolute pixel change from the warm start; the
same quantiles of the growth of Adam's per-pixel step denominator sqrt(v) since the warm start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfml.studies.diagnostics import drift_row


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--results", default="results")
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose warm start and runs are read")
    return parser


def main(args: argparse.Namespace) -> int:
    results = Path(args.results)
    seed = f"seed{args.seed}"
    warm = results / "synthetic" / args.scenario / seed / "pseudo.safetensors"
    runs = sorted(p.parent for p in (results / "metatrain" / args.scenario).glob(f"*/{seed}/shot*/pseudo_final.safetensors"))
    if not warm.is_file() or not runs:
        raise SystemExit(f"need {warm} and results/metatrain/{args.scenario}/<method>/{seed}/shot<k>/pseudo_final.safetensors"
                         f" (run the pipeline's metatrain phase for scenario {args.scenario!r} first)")
    print("| run | adversarial steps | BN term first -> last | pixel change q50 / q99 | Adam sqrt(v) growth q50 / q99 |")
    print("|---|---:|---|---|---|")
    for run in runs:
        r = drift_row(warm, run)
        print(f"| {run.parent.parent.name} {run.name.removeprefix('shot')}-shot | {r['adversarial_steps']} | "
              f"{r['bn_first']:.1f} -> {r['bn_last']:.1f} | {r['displacement_q50']:.2f} / {r['displacement_q99']:.2f} | "
              f"{r['adam_rms_ratio_q50']:.1f}x / {r['adam_rms_ratio_q99']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
