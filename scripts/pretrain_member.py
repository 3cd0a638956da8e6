"""Pretrain one pool member of a scenario (honest, or untrusted: dfml/untrusted.py) and write its weights
(safetensors) and card (JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from dfml.config import load_params
from dfml.data import DatasetStore
from dfml.device import pick_device, set_threads
from dfml.leakage import CrossDatasetLeakError, member_pool_classes, source_pool_classes
from dfml.pool import dataset_card_fields, member_paths, member_settings, plan_member, save_member
from dfml.pretrain import accuracy, member_tensors, pretrain_member, training_card_fields
from dfml.untrusted import claimed_member, seeded_init, true_member, truth


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


def honest_member(settings: dict, data_root: str, device, progress: bool) -> tuple:
    """(model, spec, card fields) of an honest member: pretrained on the classes its card names."""
    store = DatasetStore(f"{data_root}/{settings['dataset']}")
    candidates, excluded = member_pool_classes(settings, data_root)
    if excluded:
        print(f"[pretrain] {len(excluded)} meta-train classes of {settings['dataset']} left out of the pool as "
              f"cross-dataset leaks (cross_dataset_leaks: exclude)", flush=True)
    spec = plan_member(settings, candidates)
    print(f"[pretrain] scenario {spec.scenario} member {spec.index}: {spec.model} on {spec.dataset} "
          f"classes {list(spec.classes)} (device {device})", flush=True)
    result = pretrain_member(store, spec, settings["pretrain"], device, progress=progress)
    fields = {**dataset_card_fields(store, spec.classes), "cross_dataset_leaks": settings["cross_dataset_leaks"],
              "excluded_classes": [leak.to_json() for leak in excluded],
              **training_card_fields(result, settings["pretrain"])}
    return result.model, spec, fields


def untrusted_member(settings: dict, data_root: str, device, progress: bool) -> tuple:
    """(model, spec, card fields) of an untrusted member (dfml/untrusted.py): the card claims in-domain classes
    of its dataset; its truth field says what it is."""
    store = DatasetStore(f"{data_root}/{settings['dataset']}")
    candidates, excluded = member_pool_classes(settings, data_root)
    claim = claimed_member(settings, candidates)
    if settings["untrusted"]["kind"] == "deceptive_label":
        model, fields = deceptive_label_member(settings, data_root, device, progress)
    else:
        model, fields = deceptive_accuracy_member(settings, claim, store, device)
    print(f"[pretrain] scenario {claim.scenario} member {claim.index}: untrusted {claim.model} claiming "
          f"{claim.dataset} classes {list(claim.classes)}; truth {fields['truth']}", flush=True)
    return model, claim, {**dataset_card_fields(store, claim.classes),
                          "cross_dataset_leaks": settings["cross_dataset_leaks"],
                          "excluded_classes": [leak.to_json() for leak in excluded], **fields}


def deceptive_label_member(settings: dict, data_root: str, device, progress: bool) -> tuple:
    """Pretrained like an honest member, on leak-free source classes; the card claims its real held-out accuracy."""
    candidates, _ = source_pool_classes(settings, data_root)
    truly = true_member(settings, candidates)
    result = pretrain_member(DatasetStore(f"{data_root}/{truly.dataset}"), truly, settings["pretrain"], device,
                             progress=progress)
    return result.model, {**training_card_fields(result, settings["pretrain"]),
                          "truth": truth("deceptive_label", result.heldout_accuracy, truly.dataset, truly.classes)}


def deceptive_accuracy_member(settings: dict, claim, store: DatasetStore, device) -> tuple:
    """Untrained; the card claims claimed_accuracy, the truth is its accuracy on the claimed classes' held-out
    images (about chance)."""
    model = seeded_init(claim.architecture, claim.seed).to(device)
    _, _, held_x, held_y = member_tensors(store, claim, settings["pretrain"]["heldout_fraction"])
    real = accuracy(model, held_x.to(device), held_y.to(device))
    return model, {"heldout_accuracy": settings["untrusted"]["claimed_accuracy"],
                   "truth": truth("deceptive_accuracy", real)}


def main(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    set_threads(args.threads)
    device = pick_device()
    build = untrusted_member if "untrusted" in settings else honest_member
    try:
        model, spec, fields = build(settings, args.data_root, device, not args.no_progress)
    except CrossDatasetLeakError as err:
        raise SystemExit(f"[pretrain] {err}") from None
    weights, card = member_paths(f"{args.out}/{spec.scenario}", spec.index)
    saved = save_member(model, spec, weights, card, **fields, device=str(device))
    print(f"[pretrain] card: held-out accuracy {saved['heldout_accuracy']:.3f} (best epoch "
          f"{saved.get('best_epoch', '-')}) -> {weights}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
