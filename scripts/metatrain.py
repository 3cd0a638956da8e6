"""Meta-train one (scenario, method, shot) with the method's algorithm (params.yaml methods.<name>.algorithm);
resumable. The work is dfml.metatrain.run_job: see its docstring for the outputs under --out and the checkpoint.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
import sys
from pathlib import Path

from dfml.config import add_phase_arguments
from dfml.device import pick_device, set_threads
from dfml.metatrain import Job, job_settings, run_job


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--method", required=True, help="a key of params.yaml methods (purer, purer_ei, ...)")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--pseudo", default=None,
                        help="warm-started pseudo dataset (invert_pool output), for methods that need it")
    parser.add_argument("--warm-start", default=None,
                        help="invert_pool's inversion.json, with --pseudo: the warm start's seconds, charged to the "
                             "method's time budget and cost")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", required=True, help="resumable checkpoint file")
    add_phase_arguments(parser, "{seed, scenario, inversion, metatrain, evaluation, method}")
    return parser


def main(args: argparse.Namespace) -> int:
    settings = job_settings(args)
    set_threads(args.threads)
    job = Job(scenario=args.scenario, method=args.method, shot=args.shot, pool=Path(args.pool),
              pseudo=Path(args.pseudo) if args.pseudo else None, out=Path(args.out),
              checkpoint=Path(args.checkpoint), settings=settings, data_root=Path(args.data_root),
              script=Path(__file__), warm_start=Path(args.warm_start) if args.warm_start else None)
    return run_job(job, pick_device())


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
