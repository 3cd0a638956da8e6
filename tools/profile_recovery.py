"""Where a BiDf-MKD generation event's time goes: one zero-order recovery from a pool member.

    .venv/bin/python tools/profile_recovery.py --pool results/pool/ss --q 20 --steps 30 --per-class 15

Prints the recovery's wall time split into the API's answers, the estimator's own work (directions, the
weighted sum) and the rest (generator forward and backward, augmentation, Adam), with the queries sent.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
import time
from pathlib import Path

import torch

from dfml.data import DatasetStore
from dfml.device import pick_device
from dfml.inversion.recovery import RecoverySettings, recover_from_api
from dfml.models.access import BlackBoxAPI
from dfml.pool import load_member, member_paths


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="a pool directory (results/pool/<scenario>)")
    parser.add_argument("--member", type=int, default=0)
    parser.add_argument("--data-root", default="data", help="the stores (for the member's normalisation)")
    parser.add_argument("--q", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--generator-width", type=int, default=64)
    parser.add_argument("--query-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu, cuda (default: DFML_DEVICE or the best available)")
    return parser


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    member = load_member(member_paths(args.pool, args.member)[1], device)
    store = DatasetStore(Path(args.data_root) / member.card["dataset"])
    api = BlackBoxAPI.from_member(member)
    settings = RecoverySettings(steps=args.steps, q=args.q, generator_width=args.generator_width,
                                query_batch=args.query_batch)
    architecture = member.card["architecture"]
    start = time.perf_counter()
    batch = recover_from_api(api, list(range(len(api.classes))), args.per_class,
                             channels=architecture["in_channels"], image_size=architecture["image_size"],
                             mean=store.info.mean, std=store.info.std, settings=settings,
                             rng=torch.Generator().manual_seed(0), device=device)
    total = time.perf_counter() - start
    parts = {"API answers": api.seconds, "estimator (directions, weighted sum)": batch.estimator_seconds - api.seconds,
             "generator, augmentation, Adam": total - batch.estimator_seconds}
    print(f"one recovery: {len(api.classes)} classes x {args.per_class} images, q {args.q}, {args.steps} steps, "
          f"generator width {args.generator_width}, {args.threads} thread(s) on {device}")
    print("| part | seconds | share |\n|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print(f"| total | {total:.2f} | 100% |")
    print(f"{api.queries:,} queries, {api.queries / api.seconds:,.0f} images/s answered; kept step {batch.step}, "
          f"loss {batch.loss:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
