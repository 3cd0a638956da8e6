"""The scaling study's analysis (configs/scaling.yaml, docs/scaling.md): accuracy of the meta-models kept at
doublings of the meta-iterations, the meta-val selection among them, the official rule's inflation (the
maximum over kept models on meta-test), the slope per doubling fitted over the last kept models with a
bootstrap over episodes, its prediction at the paper's iterations, and the pre-registered verdict.

Results are scripts/metatest.py's JSONs under ``<root>/<scenario>/<method>/<run>/shot<k>/iter<N>/<protocol>/``:
``<split>_plain.json`` (split meta_val or meta_test) and ``meta_test_icfil.json``. Episodes are shared by every
kept model of an arm (fixed seeded streams), so a bootstrap resamples an episode with its accuracy at each.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULTS = {"paper": {}, "extrapolate_to": 60000, "fit_last": 4, "bootstrap": 2000, "bootstrap_seed": 0,
            "verdict_method": "purer", "verdict_protocol": "test1"}
RESULT = re.compile(r"(?P<scenario>[^/]+)/(?P<method>[^/]+)/(?P<run>[^/]+)/shot(?P<shot>\d+)/iter(?P<iteration>\d+)/"
                    r"(?P<protocol>[^/]+)/(?P<split>meta_val|meta_test)_(?P<calibration>[a-z]+)\.json$")
VERDICTS = ("more compute closes it", "a ceiling below the paper", "cannot tell")


@dataclass
class Arm:
    """One (scenario, method, run, shot): its results by (iteration, protocol, split, calibration)."""

    scenario: str
    method: str
    run: str
    shot: int
    results: dict[tuple[int, str, str, str], dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} {self.shot}-shot"

    def iterations(self, protocol: str, split: str = "meta_test", calibration: str = "plain") -> list[int]:
        return sorted(i for (i, p, s, c) in self.results if (p, s, c) == (protocol, split, calibration))

    def protocols(self) -> list[str]:
        return sorted({p for (_, p, _, _) in self.results})

    def accuracies(self, protocol: str, split: str = "meta_test", calibration: str = "plain") -> np.ndarray:
        """[kept model, episode] accuracies, in the order of :meth:`iterations`."""
        rows = [self.results[(i, protocol, split, calibration)]["accuracies"]
                for i in self.iterations(protocol, split, calibration)]
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{self.name} {protocol} {split}: kept models scored on different numbers of episodes")
        return np.asarray(rows, dtype=float)

    def mean(self, iteration: int, protocol: str, split: str = "meta_test", calibration: str = "plain") -> float:
        return float(self.results[(iteration, protocol, split, calibration)]["mean"])


def load_arms(paths) -> list[Arm]:
    """The arms of the result files ``paths`` (any order), each file placed by its path."""
    arms: dict[tuple, Arm] = {}
    for path in paths:
        match = RESULT.search(Path(path).as_posix())
        if match is None:
            raise ValueError(f"{path}: not a scaling result (<scenario>/<method>/<run>/shot<k>/iter<N>/<protocol>/"
                             "<split>_<calibration>.json)")
        g = match.groupdict()
        key = (g["scenario"], g["method"], g["run"], int(g["shot"]))
        arm = arms.setdefault(key, Arm(*key))
        arm.results[(int(g["iteration"]), g["protocol"], g["split"], g["calibration"])] = json.loads(
            Path(path).read_text())
    return [arms[k] for k in sorted(arms)]


def select(arm: Arm) -> dict[str, dict]:
    """Per protocol, the kept model with the best meta-val accuracy (the earliest on a tie): {protocol:
    {iteration, meta_val}}."""
    chosen = {}
    for protocol in arm.protocols():
        iterations = arm.iterations(protocol, "meta_val")
        if not iterations:
            raise ValueError(f"{arm.name} {protocol}: no meta-val scores of kept models")
        best = max(iterations, key=lambda i: (arm.mean(i, protocol, "meta_val"), -i))
        chosen[protocol] = {"iteration": best, "meta_val": arm.mean(best, protocol, "meta_val")}
    return chosen


def selected_iterations(selection_json: str) -> dict[str, int]:
    return {protocol: entry["iteration"] for protocol, entry in json.loads(selection_json)["selected"].items()}


def resampled_means(accuracies: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[resample, kept model] means over episodes drawn with replacement (the same draw for every kept model)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, accuracies.shape[1], size=(n, accuracies.shape[1]))
    return accuracies[:, draws].mean(axis=2).T


def fit_line(log_iterations: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (slope, intercept) of ``means`` ([..., kept model]) against ``log_iterations``."""
    x = log_iterations - log_iterations.mean()
    slope = (means - means.mean(axis=-1, keepdims=True)) @ x / (x @ x)
    intercept = means.mean(axis=-1) - slope * log_iterations.mean()
    return slope, intercept


def interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def fit(arm: Arm, protocol: str, settings: dict, last: int | None = None) -> dict:
    """The slope per doubling over the ``last`` kept models (all: None), its bootstrap interval, and the
    prediction at ``extrapolate_to`` iterations with its interval (accuracies in %)."""
    iterations = arm.iterations(protocol)
    accuracies = 100 * arm.accuracies(protocol)
    if last is not None:
        iterations, accuracies = iterations[-last:], accuracies[-last:]
    if len(iterations) < 2:
        raise ValueError(f"{arm.name} {protocol}: {len(iterations)} kept model(s), a slope needs 2")
    x = np.log2(np.asarray(iterations, dtype=float))
    target = math.log2(settings["extrapolate_to"])
    slope, intercept = fit_line(x, accuracies.mean(axis=1))
    boot = resampled_means(accuracies, settings["bootstrap"], settings["bootstrap_seed"])
    boot_slope, boot_intercept = fit_line(x, boot)
    return {"iterations": iterations, "slope_per_doubling": float(slope), "slope_ci": interval(boot_slope),
            "predicted": float(intercept + slope * target), "predicted_ci": interval(boot_intercept + boot_slope * target),
            "extrapolate_to": settings["extrapolate_to"]}


def verdict(predicted_ci: list[float], paper: float | None) -> str | None:
    """The pre-registered verdict: the prediction's interval at or above the paper's number, below it, or
    straddling it."""
    if paper is None:
        return None
    if predicted_ci[0] >= paper:
        return VERDICTS[0]
    if predicted_ci[1] < paper:
        return VERDICTS[1]
    return VERDICTS[2]


def official_rule_inflation(arm: Arm, protocol: str, selected: int, settings: dict) -> dict:
    """The maximum over kept models of meta-test accuracy (the official code's rule) against the meta-val
    selected model's, with a paired bootstrap interval of the difference (in points)."""
    iterations = arm.iterations(protocol)
    accuracies = 100 * arm.accuracies(protocol)
    means = accuracies.mean(axis=1)
    boot = resampled_means(accuracies, settings["bootstrap"], settings["bootstrap_seed"])
    index = iterations.index(selected)
    return {"max_iteration": iterations[int(np.argmax(means))], "max": float(means.max()),
            "selected": float(means[index]), "inflation": float(means.max() - means[index]),
            "inflation_ci": interval(boot.max(axis=1) - boot[:, index])}


def paired_difference(a: np.ndarray, b: np.ndarray, settings: dict) -> dict:
    """Mean of ``a - b`` (per-episode accuracies on the same episodes, in points) with a bootstrap interval."""
    diff = 100 * (np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    boot = resampled_means(diff[None, :], settings["bootstrap"], settings["bootstrap_seed"])[:, 0]
    return {"difference": float(diff.mean()), "ci": interval(boot)}


def analyse(arms: list[Arm], icfil: list[Arm], settings: dict) -> dict:
    """Every number of the study's report: per arm and protocol the kept models' accuracies, the selection,
    the official rule's inflation, the fits and predictions with their verdicts; ICFIL at the last and
    selected kept models; the pre-registered purer - purer_ei differences."""
    settings = {**DEFAULTS, **settings}
    icfil_by_key = {(a.scenario, a.method, a.run, a.shot): a for a in icfil}
    out = {"settings": settings, "arms": []}
    for arm in arms:
        chosen = select(arm)
        entry = {"scenario": arm.scenario, "method": arm.method, "run": arm.run, "shot": arm.shot,
                 "selected": chosen, "protocols": {}}
        paper = settings["paper"].get(f"shot{arm.shot}")
        for protocol in arm.protocols():
            iterations = arm.iterations(protocol)
            kept = [{"iteration": i, "meta_test": 100 * arm.mean(i, protocol),
                     "meta_test_ci95": 100 * arm.results[(i, protocol, "meta_test", "plain")]["ci95"],
                     "meta_val": 100 * arm.mean(i, protocol, "meta_val")} for i in iterations]
            recent = fit(arm, protocol, settings, settings["fit_last"])
            recent["verdict"] = verdict(recent["predicted_ci"], paper)
            entry["protocols"][protocol] = {
                "kept": kept, "fit": recent, "fit_all": fit(arm, protocol, settings),
                "official_rule": official_rule_inflation(arm, protocol, chosen[protocol]["iteration"], settings)}
        calibrated = icfil_by_key.get((arm.scenario, arm.method, arm.run, arm.shot))
        if calibrated is not None:
            entry["icfil"] = {p: {str(i): icfil_against_plain(calibrated, arm, i, p, settings)
                                  for i in calibrated.iterations(p, calibration="icfil")}
                              for p in calibrated.protocols()}
        out["arms"].append(entry)
    out["comparisons"] = method_differences(arms, settings)
    return out


def icfil_against_plain(calibrated: Arm, arm: Arm, iteration: int, protocol: str, settings: dict) -> dict:
    """ICFIL's meta-test accuracy at a kept model beside plain adaptation's, and ``ICFIL - plain`` paired over
    the same episodes (points, bootstrap interval)."""
    icfil = calibrated.results[(iteration, protocol, "meta_test", "icfil")]
    plain = arm.results.get((iteration, protocol, "meta_test", "plain"))
    if plain is None:
        raise ValueError(f"{arm.name} {protocol}: ICFIL scored the kept model of iteration {iteration}, plain "
                         "adaptation did not (its meta_test_plain.json is missing)")
    return {"icfil": 100 * float(icfil["mean"]), "icfil_ci95": 100 * float(icfil["ci95"]),
            "plain": 100 * float(plain["mean"]),
            "icfil_minus_plain": paired_difference(icfil["accuracies"], plain["accuracies"], settings)}


def method_differences(arms: list[Arm], settings: dict, first: str = "purer", second: str = "purer_ei") -> list[dict]:
    """``first - second`` per (scenario, run, shot, protocol) at the last kept model and at the selected ones."""
    by_key = {(a.scenario, a.method, a.run, a.shot): a for a in arms}
    rows = []
    for (scenario, method, run, shot), a in sorted(by_key.items()):
        b = by_key.get((scenario, second, run, shot))
        if method != first or b is None:
            continue
        for protocol in a.protocols():
            last = min(a.iterations(protocol)[-1], b.iterations(protocol)[-1])
            at = {"last": (last, last), "selected": (select(a)[protocol]["iteration"], select(b)[protocol]["iteration"])}
            for rule, (ia, ib) in at.items():
                diff = paired_difference(a.results[(ia, protocol, "meta_test", "plain")]["accuracies"],
                                         b.results[(ib, protocol, "meta_test", "plain")]["accuracies"], settings)
                rows.append({"scenario": scenario, "run": run, "shot": shot, "protocol": protocol, "at": rule,
                             "iterations": [ia, ib], "pair": f"{first} - {second}", **diff})
    return rows
