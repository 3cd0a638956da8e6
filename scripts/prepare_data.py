"""Build the canonical store data/<name>/ of one dataset from its source (see README "Datasets")."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dfml.config import load_params


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="dataset name (a key of params.yaml datasets)")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/glyphs")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--configfile", action="append", default=[])
    parser.add_argument("--settings-json", default=None,
                        help="the dataset entry {source, options} as JSON (what Snakemake passes; replaces --params)")
    return parser


def main(args: argparse.Namespace) -> int:
    from dfml.data.sources import prepare_dataset

    if args.settings_json:
        entry = json.loads(args.settings_json)
    else:
        datasets = load_params(args.params, args.configfile)["datasets"]
        if args.dataset not in datasets:
            raise SystemExit(f"unknown dataset {args.dataset!r}; defined in params: {sorted(datasets)}")
        entry = datasets[args.dataset]
    start = time.perf_counter()
    info = prepare_dataset(entry["source"], args.out, **entry.get("options", {}))
    counts = {split: len(names) for split, names in info.splits.items()}
    print(f"[prepare] {args.dataset} ({entry['source']}): {counts} classes, {info.image_size}x{info.image_size}x"
          f"{info.channels} -> {args.out} in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
