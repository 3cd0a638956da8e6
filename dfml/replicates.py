"""Training seeds: a run's replicates of everything after the pool, and the statistics that include them.

A meta-test result carries ``training_seed``: the seed of its warm start, meta-training and meta-val selection
(an int), or None for a model that no training seed touches (a fusion of the pool: ``average``, ``ota``). The
pool and the episodes are shared by every seed, so two methods' results of one seed are paired on the same
episodes, and so are two seeds of one method.

Two views of one cell (scenario, method, shot, calibration):

* **within a run** (the episodes): per-episode accuracy averaged over the cell's seeds, mean and 95% CI over
  the episodes. It sees the episodes' sampling noise only: another machine's arithmetic alone moves a trained
  cell by several times that CI (docs/default_run.md).
* **over training seeds** (with at least :data:`MIN_SEEDS` seeds): one mean per seed, mean and 95% CI over
  them (Student's t, seeds - 1 dof). Each seed's mean already averages its episodes, so this interval holds
  the training variance and the episode noise together.

A paired difference A - B follows the same rule: with :data:`MIN_SEEDS` seeds or more (of the seeded side;
a seedless side is the same model for every seed), the per-seed differences of the means are tested with a
one-sample t-test over seeds (the seed is the replicate; the differences of the same episodes are paired
within each seed), else the per-episode differences of the seed-averaged accuracies (the within-run view,
which leaves training variance out and says so).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

from dfml.evaluation.stats import PairedDifference, mean_ci95, paired_difference

MIN_SEEDS = 3  # below this a t interval over seeds is too wide to use (2 seeds: t_0.975,1 = 12.7)


def run_key(result: dict) -> tuple:
    return result["scenario"], result["method"], result["shot"], result["calibration"]


def seed_of(result: dict) -> int | None:
    return result.get("training_seed")


def seed_order(seed: int | None) -> int:
    """Sort key of a cell's seeds: a seedless run first, then by seed."""
    return -1 if seed is None else seed


def group_seeds(results: list[dict]) -> dict[tuple, dict[int | None, dict]]:
    """{(scenario, method, shot, calibration): {training seed: result}}; a seed twice is refused."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in results:
        seeds = groups[run_key(r)]
        if seed_of(r) in seeds:
            raise ValueError(f"{'/'.join(map(str, run_key(r)))}: two results for training seed {seed_of(r)}")
        seeds[seed_of(r)] = r
        if None in seeds and len(seeds) > 1:
            raise ValueError(f"{'/'.join(map(str, run_key(r)))}: a seedless result beside seeded ones")
    return dict(groups)


def seed_averaged_episodes(runs: list[dict]) -> list[float]:
    """Per-episode accuracy averaged over the runs (seeds) of one cell, on their shared episodes."""
    return [sum(values) / len(values) for values in zip(*(r["accuracies"] for r in runs))]


@dataclass(frozen=True)
class Cell:
    """One (scenario, method, shot, calibration) over its seeds: ``mean`` (of the seeds' means), ``ci95``
    (over seeds when ``ci_over == "seeds"``, else over episodes), ``episode_ci95`` (the within-run view,
    always), ``per_seed`` ({seed: mean}) and the seed-averaged per-episode ``accuracies``."""

    mean: float
    ci95: float
    episode_ci95: float
    ci_over: str
    per_seed: dict
    accuracies: list[float]
    episodes: int

    @property
    def seeds(self) -> int:
        return len(self.per_seed)


def summarise(runs: dict[int | None, dict]) -> Cell:
    ordered = [runs[s] for s in sorted(runs, key=seed_order)]
    averaged = seed_averaged_episodes(ordered)
    mean, episode_ci = mean_ci95(averaged)
    per_seed = {seed_of(r): r["mean"] for r in ordered}
    ci, over = episode_ci, "episodes"
    if len(ordered) >= MIN_SEEDS:
        mean, ci = mean_ci95(list(per_seed.values()))
        over = "seeds"
    return Cell(mean, ci, episode_ci, over, per_seed, averaged, ordered[0]["episodes"])


def aggregate(results: list[dict]) -> list[dict]:
    """One result-like dict per cell (what tables, metrics and figures show): the first seed's fields, with
    ``mean``, ``ci95``, ``accuracies`` (seed-averaged per episode) and ``seeds`` / ``ci_over`` /
    ``episode_ci95`` / ``per_seed`` of :func:`summarise`; ``sha256`` fingerprints the cell, ``per_seed_sha256``
    each seed's run of it (what a one-seed replay can match)."""
    cells = []
    for key, runs in sorted(group_seeds(results).items(), key=lambda kv: tuple(map(str, kv[0]))):
        cell = summarise(runs)
        first = runs[min(runs, key=seed_order)]
        cells.append({**first, "mean": cell.mean, "ci95": cell.ci95, "accuracies": cell.accuracies,
                      "seeds": cell.seeds, "ci_over": cell.ci_over, "episode_ci95": cell.episode_ci95,
                      "per_seed": {str(s): m for s, m in cell.per_seed.items()}, "training_seed": None,
                      "sha256": episodes_sha256(runs),
                      "per_seed_sha256": {str(s): episodes_sha256({s: r}) for s, r in runs.items()}})
    return cells


def episodes_sha256(runs: dict[int | None, dict]) -> str:
    """A fingerprint of every per-episode accuracy of a cell's seeds, exactly (floats by their shortest exact
    repr): two runs of a cell share it only when they agree bit for bit (what tools/replicate.py checks)."""
    exact = [[str(seed), [repr(float(a)) for a in runs[seed]["accuracies"]]]
             for seed in sorted(runs, key=seed_order)]
    return hashlib.sha256(json.dumps(exact).encode()).hexdigest()


@dataclass(frozen=True)
class ReplicatedDifference(PairedDifference):
    """A paired difference (mean, ci95, p_value over n) whose ``unit`` says what n counts ("seeds": the seeds
    paired by seed; "episodes": the seed-averaged episodes), with the ``seeds`` and ``episodes`` behind it."""

    unit: str
    seeds: int
    episodes: int


def paired_seeds(a: dict[int | None, dict], b: dict[int | None, dict]) -> list[tuple[dict, dict]]:
    """The (a, b) runs compared seed by seed: the seeds both have; a seedless side (None) is the same run for
    every seed of the other."""
    def run(side: dict, seed: int | None) -> dict | None:
        return side[None] if None in side else side.get(seed)

    seeds = sorted((set(a) | set(b)) - {None}) or [None]
    pairs = [(run(a, s), run(b, s)) for s in seeds]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        raise ValueError(f"no training seed in common: {sorted(a)} against {sorted(b)}")
    return pairs


def replicated_difference(a: dict[int | None, dict], b: dict[int | None, dict]) -> ReplicatedDifference:
    """A - B over their shared seeds (see the module docstring for which test and why)."""
    pairs = paired_seeds(a, b)
    episodes = len(pairs[0][0]["accuracies"])
    if len(pairs) >= MIN_SEEDS:
        diff = paired_difference([x["mean"] for x, _ in pairs], [y["mean"] for _, y in pairs])
        unit = "seeds"
    else:
        diff = paired_difference(seed_averaged_episodes([x for x, _ in pairs]),
                                 seed_averaged_episodes([y for _, y in pairs]))
        unit = "episodes"
    return ReplicatedDifference(diff.mean, diff.ci95, diff.p_value, diff.n, unit, len(pairs), episodes)


def variance_note(results: list[dict]) -> str:
    """What a report's intervals include, in words: over training seeds, or the episodes of one run only."""
    seeds = sorted({seed_of(r) for r in results if seed_of(r) is not None})
    if len(seeds) >= MIN_SEEDS:
        return (f"**{len(seeds)} training seeds** ({', '.join(map(str, seeds))}; the pool and the episodes are "
                "shared): accuracies are seed means, and their CIs and every paired difference's CI and p are over "
                "the seeds (Student's t with seeds - 1 dof on the per-seed means, or on the per-seed differences of "
                "the same episodes), so they include training variance; seedless baselines (fusions of the pool) "
                "are one model for every seed. The within-run view, over episodes, is in metrics.json "
                "(`episode_ci95`).")
    which = "one training seed" if len(seeds) <= 1 else f"{len(seeds)} training seeds (fewer than {MIN_SEEDS})"
    return (f"**{which[0].upper() + which[1:]}**: every CI and paired test below is over the episodes of this run "
            "(the within-run view), so differences between trained methods do **not** include training variance: "
            "the same run on another machine's arithmetic moves trained cells by several points "
            "(docs/default_run.md). Run `training_seeds` with at least "
            f"{MIN_SEEDS} seeds for comparisons that include it.")
