"""A config overlay (configs/*.yaml, what `snakemake --configfile` merges over params.yaml) as a DVC experiment,
so that `dvc exp show` compares the benchmarks and studies next to each other.

  run   `dvc exp run` with the overlay as `-S` overrides: DVC runs the stale phases (each a Snakemake target).
  save  the workspace's results of a Snakemake run made with the same overlay (`--configfile ... --config ...`),
        saved as an experiment without recomputing: the overlay is written into params.yaml, then
        `dvc exp save` records deps, params and outs in its lock and commits the experiment.

Both leave params.yaml with the overlay applied (as `dvc exp run -S` does); `git checkout params.yaml dvc.lock`
returns to the baseline.

  python tools/dvc_experiment.py run --configfile configs/benchmark.yaml --set run_scenarios=[ss] -n bench-ss
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from dfml.config import ParamsError, check_params, deep_merge, hydra_overrides


def parse_set(entries: list[str]) -> dict:
    """``key.sub=value`` pairs (values in YAML, as Snakemake's --config) as a nested overlay."""
    overlay: dict = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {entry!r}: expected key=value (dotted keys for nested settings)")
        node = overlay
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return overlay


def overlay_of(configfiles: list[Path], entries: list[str]) -> dict:
    overlay: dict = {}
    for path in configfiles:
        overlay = deep_merge(overlay, yaml.safe_load(path.read_text()) or {})
    return deep_merge(overlay, parse_set(entries))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "save", "print"], help="print: only show the -S overrides")
    parser.add_argument("--configfile", type=Path, nargs="*", default=[], help="overlays, merged in order")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="last overlay, as --config")
    parser.add_argument("-n", "--name", help="the experiment's name")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    overlay = overlay_of(args.configfile, args.set)
    base = yaml.safe_load(args.params.read_text()) or {}
    check_params(deep_merge(base, overlay))  # refuse a bad overlay before DVC runs anything
    overrides = hydra_overrides(base, overlay)
    if args.action == "print":
        print("\n".join(overrides))
        return 0
    name = ["-n", args.name] if args.name else []
    if args.action == "run":
        return subprocess.call(["dvc", "exp", "run", *name, *[a for o in overrides for a in ("-S", o)]])
    from dvc.utils.hydra import apply_overrides

    apply_overrides(args.params, overrides)
    untracked = [a for path in git_versioned_outs(Path("dvc.yaml")) if Path(path).exists() for a in ("-I", path)]
    return subprocess.call(["dvc", "exp", "save", "--force", *name, "-I", "dvc.lock", *untracked])


def git_versioned_outs(dvc_yaml: Path) -> list[str]:
    """The outs, metrics and plots dvc.yaml keeps in git (cache: false): a Snakemake run leaves them untracked,
    and `dvc exp save` would leave them out of the experiment (with dvc.lock) unless named."""
    paths = []
    for stage in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            if isinstance(entry, dict):
                paths += [path for path, options in entry.items() if (options or {}).get("cache") is False]
    return paths


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ParamsError as err:  # the message names the key: no traceback
        sys.exit(f"dvc_experiment: {err}")
