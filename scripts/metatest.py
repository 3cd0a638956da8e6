"""Meta-test one (scenario, method, shot, calibration) on the fixed meta-test episodes.

Methods: a meta-trained model (purer, purer_ei: --meta-model), or a baseline built here from the pool
(random: random Conv4 init; average: parameter average of a conv4 pool). Calibration: plain test-time
adaptation, ICFIL with the settings chosen on meta-val (--icfil), or `steps`, ICFIL's control: plain
adaptation with as many extra steps as ICFIL's calibration takes. Writes one JSON with the
per-episode accuracies (per dataset, and averaged over datasets episode by episode), mean and 95% CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)
import torch
from safetensors.torch import load_file

from dfml.config import add_phase_arguments, phase_settings
from dfml.data.store import atomic_write_text
from dfml.device import pick_device, set_threads
from dfml.evaluate import episode_accuracies, learner_scorer, mean_ci95
from dfml.meta import build_learner
from dfml.methods.purer import build_meta_model
from dfml.models import build_model
from dfml.pool import derive_seed
from dfml.scenario import episode_sets, load_scenario_pool, scenario_stores

BASELINES = ("random", "average")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--calibrations", nargs="+", choices=("plain", "icfil", "steps"),
                        default=["plain"], help="scored on the same episodes; one JSON each. steps: plain adaptation "
                        "with test_steps + ICFIL's cal_steps steps, the control for ICFIL's extra updates")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--meta-model", default=None, help="meta_model.safetensors (methods other than baselines)")
    parser.add_argument("--icfil", default=None, help="JSON with the ICFIL settings chosen on meta-val")
    parser.add_argument("--out", required=True,
                        help="output path pattern containing {calibration}, e.g. results/x/shot1_{calibration}.json")
    parser.add_argument("--split", default="meta_test", choices=("meta_val", "meta_test"))
    add_phase_arguments(parser, "{seed, scenario, metatrain, metatest}")
    return parser


def load_meta_model(args, settings: dict, device) -> torch.nn.Module:
    mt, scenario = settings["metatrain"], settings["scenario"]
    if args.method in BASELINES:
        pool = load_scenario_pool(args.pool)
        model = build_meta_model([m.model for m in pool], args.method, way=mt["way"], in_channels=scenario["channels"],
                                 image_size=scenario["image_size"], width=mt["meta_model"]["width"],
                                 pooling=mt["meta_model"]["pooling"], seed=derive_seed(settings["seed"], 201))
        return model.to(device)
    if not args.meta_model:
        raise SystemExit(f"method {args.method!r} is not a baseline ({', '.join(BASELINES)}): give --meta-model")
    card = json.loads(Path(args.meta_model).with_suffix(".json").read_text())
    model = build_model(**card["architecture"])
    model.load_state_dict(load_file(args.meta_model))
    return model.to(device)


def make_scorer(args, calibration: str, learner, model, settings: dict):
    """(episode scorer, ICFIL settings used or None, test-time steps)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    test_steps = settings["metatest"]["test_steps"]
    if calibration == "plain":
        return learner_scorer(learner, model, params), None, test_steps
    from dfml.methods.icfil import ICFILSettings, icfil_scorer

    chosen = json.loads(Path(args.icfil).read_text())["settings"] if args.icfil else {}
    icfil = ICFILSettings(**{**settings["metatest"]["icfil"], **chosen})
    if calibration == "steps":  # as many updates as ICFIL makes, all on the real support
        steps = test_steps + icfil.cal_steps
        return learner_scorer(learner, model, params, steps=steps), None, steps
    return icfil_scorer(learner, model, params, icfil, seed=derive_seed(settings["seed"], 401)), vars(icfil), test_steps


def score_episode_sets(scorer, sets, device, desc: str) -> dict:
    """Per-dataset accuracies, and the per-episode mean over datasets (MH) with its mean and CI."""
    start = time.perf_counter()
    per_dataset = {}
    for episode_set in sets:
        accuracies = episode_accuracies(scorer, episode_set, device, progress=True, desc=f"{desc} {episode_set.dataset}")
        mean, ci = mean_ci95(accuracies)
        per_dataset[episode_set.dataset] = {"mean": mean, "ci95": ci, "accuracies": accuracies,
                                            "episodes_sha256": episode_set.fingerprint()}
    averaged = [sum(values) / len(values) for values in zip(*(d["accuracies"] for d in per_dataset.values()))]
    mean, ci = mean_ci95(averaged)
    return {"mean": mean, "ci95": ci, "accuracies": averaged, "per_dataset": per_dataset,
            "seconds": round(time.perf_counter() - start, 2)}


def main(args: argparse.Namespace) -> int:
    settings = phase_settings(args, ("metatrain", "metatest"))
    set_threads(args.threads)
    device = pick_device()
    scenario, mt, test = settings["scenario"], settings["metatrain"], settings["metatest"]
    model = load_meta_model(args, settings, device)
    learner = build_learner(mt["learner"], **({} if mt["learner"] == "protonet" else
                                              {"inner_lr": mt["inner_lr"], "train_steps": mt["train_steps"],
                                               "test_steps": test["test_steps"]}))
    stores = scenario_stores(scenario, args.data_root)
    n_episodes = test["episodes"] if args.split == "meta_test" else mt["val_episodes"]
    sets = episode_sets(stores, scenario, args.split, way=mt["way"], shot=args.shot, query=test["query"],
                        n_episodes=n_episodes, seed=derive_seed(settings["seed"], 302 if args.split == "meta_test" else 301))
    for calibration in args.calibrations:
        scorer, icfil, steps = make_scorer(args, calibration, learner, model, settings)
        result = score_episode_sets(scorer, sets, device, f"{args.method} {calibration}")
        result.update(scenario=args.scenario, method=args.method, shot=args.shot, calibration=calibration,
                      split=args.split, way=mt["way"], query=test["query"], test_steps=steps,
                      episodes=n_episodes, icfil=icfil, device=str(device))
        out = Path(args.out.format(calibration=calibration))
        atomic_write_text(out, json.dumps(result) + "\n")
        print(f"[metatest] {args.scenario} {args.method} {args.shot}-shot {calibration}: {100 * result['mean']:.2f} "
              f"+- {100 * result['ci95']:.2f} % over {n_episodes} episodes x {len(sets)} dataset(s) "
              f"in {result['seconds']:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
