"""Choose ICFIL's calibration settings on META-VAL episodes (never meta-test).

Scores a meta-trained model with plain adaptation and with ICFIL for every point of the grid
(params.yaml metatest.icfil_tuning.grid) on fixed meta-val episodes, and writes the best point
(highest mean accuracy) to a JSON that the meta-test ICFIL jobs read. Grid points that share the
inversion knobs share each episode's pseudo support (one inversion per episode, not per point).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)
from safetensors.torch import load_file
from tqdm import tqdm

from dfml.config import add_phase_arguments, phase_settings
from dfml.data.store import atomic_write_text
from dfml.device import pick_device, set_threads
from dfml.evaluate import episode_accuracies, learner_scorer, mean_ci95
from dfml.meta import build_learner
from dfml.methods.icfil import ICFILSettings, icfil_grid_scorer
from dfml.models import build_model
from dfml.pool import derive_seed
from dfml.scenario import episode_sets, scenario_stores


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--meta-model", required=True, help="meta_model.safetensors of the tuning method")
    parser.add_argument("--out", required=True)
    add_phase_arguments(parser, "{seed, scenario, metatrain, metatest}")
    return parser


def grid_points(grid: dict) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def main(args: argparse.Namespace) -> int:
    settings = phase_settings(args, ("metatrain", "metatest"))
    set_threads(args.threads)
    device = pick_device()
    scenario, mt, test = settings["scenario"], settings["metatrain"], settings["metatest"]
    tuning = test["icfil_tuning"]
    card = json.loads(Path(args.meta_model).with_suffix(".json").read_text())
    model = build_model(**card["architecture"])
    model.load_state_dict(load_file(args.meta_model))
    model.to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    learner = build_learner(mt["learner"], **({} if mt["learner"] == "protonet" else
                                              {"inner_lr": mt["inner_lr"], "test_steps": test["test_steps"]}))
    sets = episode_sets(scenario_stores(scenario, args.data_root), scenario, "meta_val", way=mt["way"],
                        shot=args.shot, query=test["query"], n_episodes=tuning["episodes"],
                        seed=derive_seed(settings["seed"], 303))

    def evaluate(scorer) -> tuple[float, float]:
        accuracies = [a for es in sets for a in episode_accuracies(scorer, es, device)]
        return mean_ci95(accuracies)

    start = time.perf_counter()
    plain_mean, plain_ci = evaluate(learner_scorer(learner, model, params))
    points = grid_points(tuning["grid"])
    grid = [ICFILSettings(**{**test["icfil"], **point}) for point in points]
    scorer = icfil_grid_scorer(learner, model, params, grid, seed=derive_seed(settings["seed"], 402))
    per_point = list(zip(*(scorer(episode) for es in sets
                           for episode in tqdm(es.episodes(device), total=len(es), desc=f"ICFIL grid {es.dataset}",
                                               mininterval=2.0))))
    rows = []
    for point, accuracies in zip(points, per_point):
        mean, ci = mean_ci95(accuracies)
        rows.append({"settings": point, "mean": mean, "ci95": ci})
        print(f"[tune_icfil] {point}: {100 * mean:.2f} +- {100 * ci:.2f} (plain {100 * plain_mean:.2f})", flush=True)
    best = max(rows, key=lambda r: r["mean"])
    result = {"scenario": args.scenario, "shot": args.shot, "selected_on": "meta_val", "episodes": tuning["episodes"],
              "settings": best["settings"], "best_mean": best["mean"], "plain_mean": plain_mean,
              "plain_ci95": plain_ci, "grid": rows, "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"[tune_icfil] chose {best['settings']} ({100 * best['mean']:.2f} on meta-val) -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
