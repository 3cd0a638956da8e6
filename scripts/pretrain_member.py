"""Pretrain one pool member of a scenario and write its weights (safetensors) and card (JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from dfml.config import load_params
from dfml.data import DatasetStore
from dfml.device import pick_device, set_threads
from dfml.leakage import CrossDatasetLeakError, member_pool_classes
from dfml.pool import member_paths, member_settings, plan_member, save_member
from dfml.pretrain import pretrain_member


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--member", type=int, required=True, help="member index within the scenario")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--configfile", action="append", default=[], help="override files merged over --params")
    parser.add_argument("--settings-json", default=None,
                        help="dfml.pool.member_settings(...) as JSON (what Snakemake passes; replaces --params)")
    parser.add_argument("--data-root", default="data", help="folder holding the canonical stores")
    parser.add_argument("--out", default="results/pool", help="pool root; writes <out>/<scenario>/member_<i>.*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    if args.settings_json:
        return json.loads(args.settings_json)
    params = load_params(args.params, args.configfile)
    if args.scenario not in params["scenarios"]:
        raise SystemExit(f"unknown scenario {args.scenario!r}; defined: {sorted(params['scenarios'])}")
    return member_settings(params, args.scenario, args.member)


def main(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    set_threads(args.threads)
    store = DatasetStore(f"{args.data_root}/{settings['dataset']}")
    try:
        candidates, excluded = member_pool_classes(settings, args.data_root)
    except CrossDatasetLeakError as err:
        raise SystemExit(f"[pretrain] {err}") from None
    if excluded:
        print(f"[pretrain] {len(excluded)} meta-train classes of {settings['dataset']} left out of the pool as "
              f"cross-dataset leaks (cross_dataset_leaks: exclude)", flush=True)
    spec = plan_member(settings, candidates)
    device = pick_device()
    print(f"[pretrain] scenario {spec.scenario} member {spec.index}: {spec.model} on {spec.dataset} "
          f"classes {list(spec.classes)} (device {device})", flush=True)
    result = pretrain_member(store, spec, settings["pretrain"], device, progress=not args.no_progress)
    weights, card = member_paths(f"{args.out}/{spec.scenario}", spec.index)
    saved = save_member(
        result.model, spec, weights, card,
        class_indices=[store.classes("meta_train").index(c) for c in spec.classes],
        normalization={"mean": list(store.info.mean), "std": list(store.info.std)},
        cross_dataset_leaks=settings["cross_dataset_leaks"],
        excluded_classes=[leak.to_json() for leak in excluded],
        heldout_accuracy=round(result.heldout_accuracy, 6),
        train_accuracy=round(result.train_accuracy, 6),
        best_epoch=result.best_epoch,
        training=settings["pretrain"],
        train_seconds=round(result.seconds, 2),
        device=str(device),
        history=result.history,
    )
    print(f"[pretrain] held-out accuracy {saved['heldout_accuracy']:.3f} (best epoch {result.best_epoch}) "
          f"in {result.seconds:.1f}s -> {weights}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
