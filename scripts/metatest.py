"""Meta-test one (scenario, method, protocol, shot) on the fixed meta-test episodes, every calibration.

Methods: a meta-trained model (purer, purer_ei: --meta-model, the one meta-val selected under this
protocol), or a baseline built here from the pool (random: random Conv4 init; average: parameter
average of a conv4 pool; ota: that pool fused after optimal-transport neuron alignment). Calibrations:
plain test-time adaptation (the protocol's test_steps), ICFIL, or `steps`, ICFIL's control: plain
adaptation with extra steps on the real support. ICFIL's settings and the control's step count are first tuned on meta-val for this very model (dfml/tuning.py;
written to --tuning-out), then the meta-test episodes are scored once. Writes one JSON per calibration
with the per-episode accuracies (per dataset, and averaged over datasets episode by episode), mean and
95% CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)
import torch

from dfml.methods.icfil import ICFILSettings, icfil_scorer

from dfml.config import add_phase_arguments, phase_settings
from dfml.data.store import atomic_write_text
from dfml.device import pick_device, set_threads
from dfml.evaluate import episode_accuracies, episode_means, learner_scorer, mean_ci95
from dfml.models.card import ModelFileError, load_meta_model
from dfml.models.fusion import BASELINE_INITS, baseline_parts, build_meta_model
from dfml.pool import derive_seed, training_draw
from dfml.protocol import Protocol, evaluation_protocol, make_learner
from dfml.tuning import tune_extra_steps, tune_icfil
from dfml.scenario import episode_sets, load_scenario_pool, scenario_stores



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--protocol", required=True, help="a key of params.yaml evaluation.protocols")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--calibrations", nargs="+", choices=("plain", "icfil", "steps"),
                        default=["plain"], help="scored on the same episodes; one JSON each. steps: plain adaptation "
                        "with test_steps + k steps (k tuned on meta-val), the control for ICFIL's extra updates")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--meta-model", default=None, help="meta_model.safetensors (methods other than baselines)")
    parser.add_argument("--tuning-out", default=None,
                        help="where to write the meta-val tuning of icfil / steps (needed when they are scored)")
    parser.add_argument("--out", required=True,
                        help="output path pattern containing {calibration}, e.g. results/x/shot1_{calibration}.json")
    parser.add_argument("--split", default="meta_test", choices=("meta_val", "meta_test"))
    add_phase_arguments(parser, "{seed, scenario, metatrain, evaluation, metatest}")
    return parser


def is_baseline(method: str) -> bool:
    try:
        baseline_parts(method)
    except ValueError:
        return False
    return True


def meta_model_to_test(args, settings: dict, device) -> torch.nn.Module:
    mt, scenario = settings["metatrain"], settings["scenario"]
    if is_baseline(args.method):
        pool = load_scenario_pool(args.pool)
        model = build_meta_model([m.model for m in pool], baseline_parts(args.method)[0], way=mt["way"],
                                 in_channels=scenario["channels"], image_size=scenario["image_size"], width=mt["meta_model"]["width"],
                                 pooling=mt["meta_model"]["pooling"], seed=training_draw(settings, 201))
        return model.to(device)
    if not args.meta_model:
        raise SystemExit(f"method {args.method!r} is not a baseline ({', '.join(BASELINE_INITS)}, optionally with "
                         "_<learner>): give --meta-model")
    return load_meta_model(args.meta_model, device)


def model_start(args, settings: dict) -> dict:
    """Where the tested model started, for a comparison with its own start (dfml.report.start_of): the
    initialisation (a baseline's own; a trained model's from its card) and the learner it adapts with."""
    if is_baseline(args.method):
        init = baseline_parts(args.method)[0]
    else:
        init = json.loads(Path(args.meta_model).with_suffix(".json").read_text()).get("init")
    return {"baseline": is_baseline(args.method), "init": init, "learner": settings["metatrain"]["learner"],
            "training_seed": settings.get("training_seed")}


def tune(args, learner, model, settings: dict, protocol: Protocol, device) -> dict:
    """ICFIL's settings and the steps control's extra steps, chosen on meta-val for this model."""
    mt, test = settings["metatrain"], settings["metatest"]
    tuning = test["icfil_tuning"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    sets = episode_sets(scenario_stores(settings["scenario"], args.data_root), settings["scenario"], "meta_val",
                        way=mt["way"], shot=args.shot, query=protocol.query, n_episodes=tuning["episodes"],
                        seed=derive_seed(settings["seed"], 303))
    start = time.perf_counter()
    result = {"scenario": args.scenario, "method": args.method, "protocol": protocol.name, "shot": args.shot,
              "selected_on": "meta_val", "episodes": tuning["episodes"], "datasets": [es.dataset for es in sets]}
    base = ICFILSettings(**test["icfil"])
    if "icfil" in args.calibrations:
        result["icfil"] = tune_icfil(learner, model, params, base, tuning["grid"], sets, device,
                                     seed=derive_seed(settings["seed"], 402), steps=protocol.test_steps)
    if "steps" in args.calibrations:
        candidates = tuning["grid"].get("cal_steps", [base.cal_steps])
        result["steps"] = tune_extra_steps(learner, model, params, candidates, sets, device, protocol.test_steps)
    result["seconds"] = round(time.perf_counter() - start, 2)
    for name in ("icfil", "steps"):
        if name in result:
            chosen = result[name]
            print(f"[metatest] tuned {name} on meta-val: {chosen['settings']} ({100 * chosen['mean']:.2f}%, "
                  f"{'decisive' if chosen['decisive'] else 'tied within noise with another point'})", flush=True)
    return result


def make_scorer(calibration: str, learner, model, settings: dict, protocol: Protocol, tuned: dict | None):
    """(episode scorer, ICFIL settings used or None, test-time steps)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    if calibration == "plain":
        return learner_scorer(learner, model, params, steps=protocol.test_steps), None, protocol.test_steps
    if calibration == "steps":  # extra updates on the real support, as many as tuned on meta-val
        steps = protocol.test_steps + tuned["steps"]["settings"]["extra_steps"]
        return learner_scorer(learner, model, params, steps=steps), None, steps
    icfil = ICFILSettings(**{**settings["metatest"]["icfil"], **tuned["icfil"]["settings"]})
    scorer = icfil_scorer(learner, model, params, icfil, seed=derive_seed(settings["seed"], 401),
                          steps=protocol.test_steps)
    return scorer, vars(icfil), protocol.test_steps


def score_episode_sets(scorer, sets, device, desc: str) -> dict:
    """Per-dataset accuracies, and the per-episode mean over datasets (MH) with its mean and CI."""
    start = time.perf_counter()
    per_dataset = {}
    for episode_set in sets:
        accuracies = episode_accuracies(scorer, episode_set, device, progress=True, desc=f"{desc} {episode_set.dataset}")
        mean, ci = mean_ci95(accuracies)
        per_dataset[episode_set.dataset] = {"mean": mean, "ci95": ci, "accuracies": accuracies,
                                            "episodes_sha256": episode_set.fingerprint()}
    averaged = episode_means([d["accuracies"] for d in per_dataset.values()])
    mean, ci = mean_ci95(averaged)
    return {"mean": mean, "ci95": ci, "accuracies": averaged, "per_dataset": per_dataset,
            "seconds": round(time.perf_counter() - start, 2)}


def main(args: argparse.Namespace) -> int:
    settings = phase_settings(args, ("metatrain", "evaluation", "metatest"))
    set_threads(args.threads)
    device = pick_device()
    scenario, mt, test = settings["scenario"], settings["metatrain"], settings["metatest"]
    protocol = evaluation_protocol(settings, args.protocol)
    try:
        model = meta_model_to_test(args, settings, device)
    except ModelFileError as err:  # a corrupt, truncated or pickled model or pool member: named, no traceback
        raise SystemExit(f"[metatest] {err}") from None
    learner = make_learner(mt, protocol.test_steps)
    start = model_start(args, settings)
    tuned = None
    if {"icfil", "steps"} & set(args.calibrations):
        if not args.tuning_out:
            raise SystemExit("icfil and steps are tuned on meta-val first: give --tuning-out")
        tuned = tune(args, learner, model, settings, protocol, device)
        atomic_write_text(Path(args.tuning_out), json.dumps(tuned, indent=2) + "\n")
    stores = scenario_stores(scenario, args.data_root)
    n_episodes = test["episodes"] if args.split == "meta_test" else mt["val_episodes"]
    sets = episode_sets(stores, scenario, args.split, way=mt["way"], shot=args.shot, query=protocol.query,
                        n_episodes=n_episodes, seed=derive_seed(settings["seed"], 302 if args.split == "meta_test" else 301))
    for calibration in args.calibrations:
        scorer, icfil, steps = make_scorer(calibration, learner, model, settings, protocol, tuned)
        result = score_episode_sets(scorer, sets, device, f"{args.method} {calibration}")
        result.update(scenario=args.scenario, method=args.method, protocol=protocol.name, shot=args.shot,
                      calibration=calibration, split=args.split, way=mt["way"], query=protocol.query,
                      test_steps=steps, episodes=n_episodes, icfil=icfil, device=str(device), **start)
        out = Path(args.out.format(calibration=calibration))
        atomic_write_text(out, json.dumps(result) + "\n")
        print(f"[metatest] {args.scenario} {args.method} {protocol.name} {args.shot}-shot {calibration}: "
              f"{100 * result['mean']:.2f} +- {100 * result['ci95']:.2f} % over {n_episodes} episodes x {len(sets)} "
              f"dataset(s) in {result['seconds']:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
