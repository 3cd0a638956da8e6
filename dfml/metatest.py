"""The meta-test phase for one (scenario, method, protocol, shot): the model, its calibrations, the scores.

:func:`run_job` takes the model to test: a meta-trained model (``meta_model``: the one meta-val selected under
this protocol) or a baseline built here from the pool (random: random Conv4 init; average: parameter average of
a conv4 pool; ota: that pool fused after optimal-transport neuron alignment; drawn as a method's meta-model
initialisation is, so a baseline is the start a trained method began from). It adapts with the protocol's
learner and scores every calibration on the same fixed episodes of ``split``:

* ``plain``: test-time adaptation with the protocol's ``test_steps``;
* ``icfil``: plain adaptation, then ICFIL (dfml/evaluation/icfil.py);
* ``steps``: ICFIL's control, plain adaptation with extra steps on the real support.

ICFIL's settings and the control's step count are first tuned on meta-val for this very model
(dfml/evaluation/tuning.py; written to ``tuning_out``), on episodes apart from the selection's, before the
meta-test episodes are touched. Writes one JSON per calibration (``out`` with ``{calibration}`` filled in): the
per-episode accuracies per dataset and averaged over datasets episode by episode, their mean and 95% CI, and
where the model started (for a comparison with its own start, dfml.report.start_of). Which episodes each split
and each tuning draws: dfml/seeds.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dfml.config import phase_settings
from dfml.data.store import atomic_write_text
from dfml.evaluation.episodes import EpisodeSet, episode_means, episode_sets
from dfml.evaluation.icfil import ICFILSettings
from dfml.evaluation.icfil_scoring import icfil_scorer
from dfml.evaluation.protocol import Protocol, evaluation_protocol, make_learner
from dfml.evaluation.scoring import episode_accuracies, learner_scorer
from dfml.evaluation.selection import selection_sets
from dfml.evaluation.stats import mean_ci95
from dfml.evaluation.tuning import TUNED, tune_calibrations, tuning_sets
from dfml.models.card import ModelFileError, load_meta_model
from dfml.models.fusion import BASELINE_INITS, baseline_parts, build_meta_model
from dfml.scenario import load_scenario_pool, scenario_stores
from dfml.seeds import ICFIL_TEST, META_MODEL_INIT, META_TEST_EPISODES, stream_seed, training_draw

CALIBRATIONS = ("plain", "icfil", "steps")
SPLITS = ("meta_val", "meta_test")


@dataclass
class Job:
    """One meta-test job: which model under which protocol and shot, what to score, where to write, and its
    settings ({seed, scenario, metatrain, evaluation, metatest})."""

    scenario: str
    method: str
    protocol: str
    shot: int
    pool: Path
    out: str  # a path pattern with {calibration}
    settings: dict
    calibrations: tuple[str, ...] = ("plain",)
    meta_model: Path | None = None  # a meta-trained model (methods other than baselines)
    tuning_out: Path | None = None  # where the meta-val tuning of icfil / steps goes (needed when they are scored)
    split: str = "meta_test"  # meta_val: the selection's episodes (dfml/seeds.py)
    data_root: Path = Path("data")


def job_settings(args) -> dict:
    """The job's settings: from --settings-json (Snakemake), or params.yaml."""
    return phase_settings(args, ("metatrain", "evaluation", "metatest"))


def is_baseline(method: str) -> bool:
    try:
        baseline_parts(method)
    except ValueError:
        return False
    return True


def meta_model_to_test(job: Job, device) -> torch.nn.Module:
    """The trained model of ``job.meta_model``, or the baseline ``job.method`` built from the pool."""
    settings = job.settings
    mt, scenario = settings["metatrain"], settings["scenario"]
    if is_baseline(job.method):
        pool = load_scenario_pool(job.pool)
        model = build_meta_model([m.model for m in pool], baseline_parts(job.method)[0], way=mt["way"],
                                 in_channels=scenario["channels"], image_size=scenario["image_size"],
                                 width=mt["meta_model"]["width"], pooling=mt["meta_model"]["pooling"],
                                 seed=training_draw(settings, META_MODEL_INIT))
        return model.to(device)
    if not job.meta_model:
        raise SystemExit(f"method {job.method!r} is not a baseline ({', '.join(BASELINE_INITS)}, optionally with "
                         "_<learner>): give --meta-model")
    return load_meta_model(job.meta_model, device)


def model_start(job: Job) -> dict:
    """Where the tested model started, for a comparison with its own start (dfml.report.start_of): the
    initialisation (a baseline's own; a trained model's from its card) and the learner it adapts with."""
    if is_baseline(job.method):
        init = baseline_parts(job.method)[0]
    else:
        init = json.loads(Path(job.meta_model).with_suffix(".json").read_text()).get("init")
    return {"baseline": is_baseline(job.method), "init": init, "learner": job.settings["metatrain"]["learner"],
            "training_seed": job.settings.get("training_seed")}


def tune(job: Job, learner, model, protocol: Protocol, device, log: Callable[[str], None]) -> dict:
    """ICFIL's settings and the steps control's extra steps, chosen on meta-val for this model: the record
    written to ``job.tuning_out``."""
    settings = job.settings
    episodes = settings["metatest"]["icfil_tuning"]["episodes"]
    sets = tuning_sets(scenario_stores(settings["scenario"], job.data_root), settings, shot=job.shot,
                       query=protocol.query)
    start = time.perf_counter()
    result = {"scenario": job.scenario, "method": job.method, "protocol": protocol.name, "shot": job.shot,
              "selected_on": "meta_val", "episodes": episodes, "datasets": [es.dataset for es in sets]}
    result.update(tune_calibrations(learner, model, settings, protocol, sets, device, job.calibrations))
    result["seconds"] = round(time.perf_counter() - start, 2)
    for name in TUNED:
        if name in result:
            chosen = result[name]
            log(f"tuned {name} on meta-val: {chosen['settings']} ({100 * chosen['mean']:.2f}%, "
                f"{'decisive' if chosen['decisive'] else 'tied within noise with another point'})")
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
    scorer = icfil_scorer(learner, model, params, icfil, seed=stream_seed(settings, ICFIL_TEST),
                          steps=protocol.test_steps)
    return scorer, vars(icfil), protocol.test_steps


def score_episode_sets(scorer, sets: list[EpisodeSet], device, desc: str) -> dict:
    """Per-dataset accuracies, and the per-episode mean over datasets (MH) with its mean and CI."""
    start = time.perf_counter()
    per_dataset = {}
    for episode_set in sets:
        accuracies = episode_accuracies(scorer, episode_set, device, progress=True,
                                        desc=f"{desc} {episode_set.dataset}")
        mean, ci = mean_ci95(accuracies)
        per_dataset[episode_set.dataset] = {"mean": mean, "ci95": ci, "accuracies": accuracies,
                                            "episodes_sha256": episode_set.fingerprint()}
    averaged = episode_means([d["accuracies"] for d in per_dataset.values()])
    mean, ci = mean_ci95(averaged)
    return {"mean": mean, "ci95": ci, "accuracies": averaged, "per_dataset": per_dataset,
            "seconds": round(time.perf_counter() - start, 2)}


def split_sets(job: Job, protocol: Protocol) -> tuple[list[EpisodeSet], int]:
    """The episodes of ``job.split``, one set per dataset, and their number per dataset: meta_test's, or
    meta-val's selection episodes (the same the selection scored during meta-training)."""
    settings, mt = job.settings, job.settings["metatrain"]
    stores = scenario_stores(settings["scenario"], job.data_root)
    if job.split == "meta_test":
        n_episodes = settings["metatest"]["episodes"]
        return episode_sets(stores, settings["scenario"], "meta_test", way=mt["way"], shot=job.shot,
                            query=protocol.query, n_episodes=n_episodes,
                            seed=stream_seed(settings, META_TEST_EPISODES)), n_episodes
    if job.split == "meta_val":
        n_episodes = mt["val_episodes"]
        return selection_sets(stores, settings, way=mt["way"], shot=job.shot, query=protocol.query,
                              n_episodes=n_episodes), n_episodes
    raise ValueError(f"split must be one of {SPLITS}, got {job.split!r}")


def run_job(job: Job, device: torch.device, log=lambda message: print(f"[metatest] {message}", flush=True)) -> int:
    """Tune (when a tuned calibration is asked for), score every calibration and write its JSON; 0 when done."""
    settings, mt = job.settings, job.settings["metatrain"]
    unknown = sorted(set(job.calibrations) - set(CALIBRATIONS))
    if unknown:
        raise ValueError(f"unknown calibrations {unknown}; known: {list(CALIBRATIONS)}")
    protocol = evaluation_protocol(settings, job.protocol)
    try:
        model = meta_model_to_test(job, device)
    except ModelFileError as err:  # a corrupt, truncated or pickled model or pool member: named, no traceback
        raise SystemExit(f"[metatest] {err}") from None
    learner = make_learner(mt, protocol.test_steps)
    start = model_start(job)
    tuned = None
    if set(TUNED) & set(job.calibrations):
        if not job.tuning_out:
            raise SystemExit("icfil and steps are tuned on meta-val first: give --tuning-out")
        tuned = tune(job, learner, model, protocol, device, log)
        atomic_write_text(Path(job.tuning_out), json.dumps(tuned, indent=2) + "\n")
    sets, n_episodes = split_sets(job, protocol)
    for calibration in job.calibrations:
        scorer, icfil, steps = make_scorer(calibration, learner, model, settings, protocol, tuned)
        result = score_episode_sets(scorer, sets, device, f"{job.method} {calibration}")
        result.update(scenario=job.scenario, method=job.method, protocol=protocol.name, shot=job.shot,
                      calibration=calibration, split=job.split, way=mt["way"], query=protocol.query,
                      test_steps=steps, episodes=n_episodes, icfil=icfil, device=str(device), **start)
        out = Path(job.out.format(calibration=calibration))
        atomic_write_text(out, json.dumps(result) + "\n")
        log(f"{job.scenario} {job.method} {protocol.name} {job.shot}-shot {calibration}: "
            f"{100 * result['mean']:.2f} +- {100 * result['ci95']:.2f} % over {n_episodes} episodes x {len(sets)} "
            f"dataset(s) in {result['seconds']:.0f}s -> {out}")
    return 0
