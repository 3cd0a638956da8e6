"""The `dfml` command: small entry points to the library (the pipeline itself runs through Snakemake).

    dfml prepare glyphs                 # build data/glyphs from the params.yaml entry
    dfml prepare mydata --source imagefolder --option root=/path/to/folders --option image_size=32
    dfml info data/glyphs               # classes per split, image format, normalisation
    dfml pool results/pool/ss           # validate a pool and print its members
"""

from __future__ import annotations

import argparse
import sys

import yaml


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key] = yaml.safe_load(value)
    return options


def cmd_prepare(args: argparse.Namespace) -> int:
    from dfml.config import load_params
    from dfml.data.sources import prepare_dataset

    if args.source:
        source, options = args.source, parse_options(args.option)
    else:
        datasets = load_params(args.params)["datasets"]
        if args.name not in datasets:
            raise SystemExit(f"dataset {args.name!r} is not in {args.params} (defined: {sorted(datasets)}); "
                             f"give --source to build it directly")
        source = datasets[args.name]["source"]
        options = {**datasets[args.name].get("options", {}), **parse_options(args.option)}
    info = prepare_dataset(source, args.out or f"data/{args.name}", **options)
    print(f"{args.name}: {', '.join(f'{k} {len(v)}' for k, v in info.splits.items())} classes, "
          f"{info.image_size}x{info.image_size}x{info.channels} -> {args.out or f'data/{args.name}'}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dfml.data import DatasetStore

    store = DatasetStore(args.store)
    print(f"{store.name} ({store.info.source}): {store.image_size}x{store.image_size}x{store.channels}, "
          f"mean {store.info.mean} std {store.info.std}")
    for split in store.info.splits:
        names = store.classes(split)
        sizes = [store.images(n).shape[0] for n in names]
        print(f"  {split:10s} {len(names):5d} classes, {sum(sizes):7d} images ({min(sizes)}-{max(sizes)} per class)")
    return 0


def cmd_pool(args: argparse.Namespace) -> int:
    from dfml.pool import load_pool

    for member in load_pool(args.pool_dir):
        card = member.card
        print(f"member {card['index']:3d} {card['architecture']['name']:9s} {card['dataset']:10s} "
              f"held-out {card.get('heldout_accuracy', float('nan')):.3f} classes {' '.join(card['classes'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build a canonical dataset store")
    prepare.add_argument("name", help="dataset name (a params.yaml datasets key, or a new name with --source)")
    prepare.add_argument("--source", help="glyphs, omniglot, cifarfs, miniimagenet or imagefolder")
    prepare.add_argument("--option", action="append", default=[], help="source option key=value (repeatable)")
    prepare.add_argument("--out", help="output folder (default data/<name>)")
    prepare.add_argument("--params", default="params.yaml")
    prepare.set_defaults(func=cmd_prepare)
    info = sub.add_parser("info", help="describe a canonical dataset store")
    info.add_argument("store")
    info.set_defaults(func=cmd_info)
    pool = sub.add_parser("pool", help="validate and list a model pool")
    pool.add_argument("pool_dir")
    pool.set_defaults(func=cmd_pool)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"dfml {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
