"""Test-time settings chosen on META-VAL for one (method, protocol, shot), never on meta-test.

ICFIL's calibration settings (params.yaml ``metatest.icfil_tuning.grid``) and the matched-steps
control's extra step count (the grid's ``cal_steps`` values, as plain steps on the real support) are
each tuned on the model they will be used with, so no row of the report borrows another method's
choice. Every grid point is scored on the same fixed meta-val episodes; the result keeps every point's
mean, CI and paired gap to the chosen one, and says whether the choice is decisive (the chosen point
beats every other with a paired 95% CI excluding 0) or a tie within noise. Seeds (dfml/seeds.py): the
meta-val episodes are TUNING_EPISODES, not the selection's; ICFIL's inversions ICFIL_TUNING, not meta-test's.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from dfml.data import DatasetStore
from dfml.evaluation.batched import score_episodes
from dfml.evaluation.episodes import EpisodeSet, episode_means, episode_sets
from dfml.evaluation.icfil import ICFILSettings
from dfml.evaluation.icfil_scoring import icfil_grid_scorer
from dfml.evaluation.protocol import Protocol
from dfml.evaluation.scoring import learner_scorer
from dfml.evaluation.stats import mean_ci95, paired_difference
from dfml.seeds import ICFIL_TUNING, TUNING_EPISODES, stream_seed

TUNED = ("icfil", "steps")  # the calibrations with settings tuned on meta-val


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, as settings dicts (keys sorted)."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def rank_points(points: list[dict], accuracies: list[list[float]]) -> dict:
    """The best point by mean accuracy, and every point's score and paired gap to it."""
    means = [mean_ci95(a)[0] for a in accuracies]
    best = max(range(len(points)), key=lambda i: means[i])
    rows = []
    for point, accuracy, mean in zip(points, accuracies, means):
        gap = paired_difference(accuracies[best], accuracy)
        rows.append({"settings": point, "mean": mean, "ci95": mean_ci95(accuracy)[1], "gap_to_chosen": gap.mean,
                     "gap_ci95": gap.ci95, "gap_p_value": gap.p_value})
    others = [r for i, r in enumerate(rows) if i != best]
    return {"settings": points[best], "mean": means[best], "grid": rows,
            "decisive": all(r["gap_to_chosen"] > r["gap_ci95"] for r in others)}


def score_sets(scorer, sets: Sequence[EpisodeSet], device, desc: str) -> list:
    """``scorer(episode)`` for every episode of every set: [dataset][episode] -> score (batched evaluation)."""
    return [score_episodes(scorer, es, device, progress=True, desc=f"{desc} {es.dataset}") for es in sets]


def tune_icfil(learner, model, params, base: ICFILSettings, grid: dict, sets: Sequence[EpisodeSet], device,
               seed: int, steps: int) -> dict:
    """ICFIL's grid on meta-val: points sharing the inversion knobs share each episode's inversion."""
    points = grid_points(grid)
    settings = [ICFILSettings(**{**vars(base), **point}) for point in points]
    scorer = icfil_grid_scorer(learner, model, params, settings, seed=seed, steps=steps)
    per_dataset = score_sets(scorer, sets, device, "tune ICFIL")  # [dataset][episode][point]
    per_point = [episode_means([[episode[i] for episode in dataset] for dataset in per_dataset])
                 for i in range(len(points))]
    return rank_points(points, per_point)


def tune_extra_steps(learner, model, params, candidates: Sequence[int], sets: Sequence[EpisodeSet], device,
                     steps: int) -> dict:
    """The steps control: ``steps + k`` plain steps on the real support, ``k`` chosen among ``candidates``."""
    points = [{"extra_steps": k} for k in sorted(set(candidates))]
    per_point = []
    for point in points:
        scorer = learner_scorer(learner, model, params, steps=steps + point["extra_steps"])
        per_point.append(episode_means(score_sets(scorer, sets, device, f"tune steps +{point['extra_steps']}")))
    return rank_points(points, per_point)


def tuning_sets(stores: dict[str, DatasetStore], settings: dict, *, shot: int, query: int) -> list[EpisodeSet]:
    """The meta-val episodes every point of the grids is scored on (``metatest.icfil_tuning.episodes`` per
    dataset of ``settings["scenario"]``)."""
    return episode_sets(stores, settings["scenario"], "meta_val", way=settings["metatrain"]["way"], shot=shot,
                        query=query, n_episodes=settings["metatest"]["icfil_tuning"]["episodes"],
                        seed=stream_seed(settings, TUNING_EPISODES))


def tune_calibrations(learner, model, settings: dict, protocol: Protocol, sets: Sequence[EpisodeSet], device,
                      calibrations: Sequence[str]) -> dict:
    """{calibration: its ranked grid} for the tuned ones among ``calibrations`` (ICFIL's grid is
    ``metatest.icfil_tuning.grid`` over ``metatest.icfil``; the steps control's candidates are its ``cal_steps``)."""
    test, tuned = settings["metatest"], {}
    grid = test["icfil_tuning"]["grid"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    base = ICFILSettings(**test["icfil"])
    if "icfil" in calibrations:
        tuned["icfil"] = tune_icfil(learner, model, params, base, grid, sets, device,
                                    seed=stream_seed(settings, ICFIL_TUNING), steps=protocol.test_steps)
    if "steps" in calibrations:
        candidates = grid.get("cal_steps", [base.cal_steps])
        tuned["steps"] = tune_extra_steps(learner, model, params, candidates, sets, device, protocol.test_steps)
    return tuned
