"""The overlay that replays a time-budgeted run exactly: each method's iterations pinned per shot to those its
meta-training reached under one training seed (from training_cost of
results/metatrain/<scenario>/<method>/seed<t>/shot<k>/curve.csv), and its time budget lifted; other seeds of a
run stopped at other iterations, so an overlay replays one seed (--seed; the overlay sets training_seeds: [<t>]).
Layer it over the run's own config:

  python tools/pin_iterations.py --scenario ss --seed 0 --out pins.yaml
  snakemake --cores all --workflow-profile workflow/profiles/local --configfile configs/benchmark.yaml pins.yaml \\
    --config run_scenarios=[ss]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dfml.report import training_cost


def pinned_iterations(metatrain_root: Path, scenario: str, seed: int = 0) -> dict:
    """{training_seeds: [seed], methods: {name: {iterations: {shot<k>: N}, time_budget: None}}} for every trained
    method of ``scenario``, as training seed ``seed`` reached them."""
    methods: dict = {}
    for curve in sorted((metatrain_root / scenario).glob(f"*/seed{seed}/shot*/curve.csv")):
        method, shot = curve.parent.parent.parent.name, curve.parent.name
        pins = methods.setdefault(method, {"iterations": {}, "time_budget": None})
        pins["iterations"][shot] = training_cost(curve)["iterations"]
    if not methods:
        raise SystemExit(f"no meta-training curve under {metatrain_root / scenario}/<method>/seed{seed}/shot<k>/")
    return {"training_seeds": [seed], "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--metatrain", type=Path, default=Path("results/metatrain"))
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose iterations are pinned")
    parser.add_argument("--out", type=Path, help="the overlay file (default: standard output)")
    args = parser.parse_args(argv)
    text = (f"# The iterations each run of {args.scenario} reached in its time budget (tools/pin_iterations.py):\n"
            "# layered over the run's config, they replay its meta-training whatever the machine's speed.\n"
            + yaml.safe_dump(pinned_iterations(args.metatrain, args.scenario, args.seed), sort_keys=False))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
