"""Meta-test one (scenario, method, protocol, shot) on the fixed meta-test episodes, every calibration (plain,
icfil, steps), ICFIL and the steps control first tuned on meta-val. The work is dfml.metatest.run_job: see its
docstring for the models, the calibrations and the outputs.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
import sys
from pathlib import Path

from dfml.config import add_phase_arguments
from dfml.device import pick_device, set_threads
from dfml.metatest import CALIBRATIONS, SPLITS, Job, job_settings, run_job


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--protocol", required=True, help="a key of params.yaml evaluation.protocols")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--calibrations", nargs="+", choices=CALIBRATIONS,
                        default=["plain"], help="scored on the same episodes; one JSON each. steps: plain adaptation "
                        "with test_steps + k steps (k tuned on meta-val), the control for ICFIL's extra updates")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--meta-model", default=None, help="meta_model.safetensors (methods other than baselines)")
    parser.add_argument("--tuning-out", default=None,
                        help="where to write the meta-val tuning of icfil / steps (needed when they are scored)")
    parser.add_argument("--out", required=True,
                        help="output path pattern containing {calibration}, e.g. results/x/shot1_{calibration}.json")
    parser.add_argument("--split", default="meta_test", choices=SPLITS)
    add_phase_arguments(parser, "{seed, scenario, metatrain, evaluation, metatest}")
    return parser


def main(args: argparse.Namespace) -> int:
    settings = job_settings(args)
    set_threads(args.threads)
    job = Job(scenario=args.scenario, method=args.method, protocol=args.protocol, shot=args.shot,
              pool=Path(args.pool), out=args.out, settings=settings, calibrations=tuple(args.calibrations),
              meta_model=Path(args.meta_model) if args.meta_model else None,
              tuning_out=Path(args.tuning_out) if args.tuning_out else None, split=args.split,
              data_root=Path(args.data_root))
    return run_job(job, pick_device())


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
