"""The meta-training phase for one (scenario, method, shot), whatever the method's algorithm.

:func:`run_job` loads the pool (and the warm-start pseudo data when the method needs it, with the seconds its
inversion took: invert_pool's inversion.json), builds the meta-model (``metatrain.init``; ``auto``: the pool's
average when it can be fused, else random) and the method (dfml/methods/base.py), then runs the shared loop
(dfml/methods/loop.py), selecting one meta-model per evaluation protocol on meta-val
(dfml/evaluation/selection.py). Writes to ``out``: <protocol>/meta_model.safetensors + its card
<protocol>/meta_model.json, curve.csv (per iteration: meta loss and accuracy, the method's own columns, the
wall time, meta-val accuracy per protocol when evaluated; the row of iteration 0 holds the warm start's seconds
for a method on the pseudo data: they are charged to its time budget and its cost), and the method's own
outputs (PURER: pseudo_final.safetensors). A black-box method (BiDf-MKD) gets the members only as counted
query functions (dfml/models/access.py), starts from a random meta-model, and its cards record the API
queries it used.

The checkpoint is reused when the job is rerun after a kill (SIGTERM: a final checkpoint, exit 143;
SIGKILL: the last periodic one) by the same code; it holds the best models and sits next to a copy of the
curve, so a rerun restores the outputs Snakemake deleted when the killed job failed. A checkpoint written
for other settings, other pseudo data or by other code (the script or a dfml module the job runs, compared by
a digest blind to comments, docstrings and layout: dfml/codedeps.py) is ignored: the run starts over.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dfml.codedeps import code_digest, metatrain_choices
from dfml.config import method_for_shot, method_metatrain, phase_settings
from dfml.data.store import atomic_save_tensors, atomic_write_text
from dfml.evaluation.episodes import episode_sets
from dfml.evaluation.protocol import evaluation_protocols, make_learner
from dfml.evaluation.selection import BestModels, meta_val_evaluator, selection_sets
from dfml.inversion import PseudoDataset
from dfml.kept_models import KeptModels
from dfml.methods.base import MetaTrainingMethod, MethodInputs, StepLog, curve_value, method_class
from dfml.methods.loop import Schedule, StopRequested, budget_used, resume, train
from dfml.models.access import AccessError, BlackBoxAPI, check_access, total_queries
from dfml.models.card import META_MODEL_FORMAT, ModelFileError
from dfml.models.fusion import build_meta_model, choose_init
from dfml.scenario import load_scenario_pool, scenario_stores
from dfml.seeds import META_MODEL_INIT, METHOD_DRAWS, TRAINING_META_VAL_EPISODES, stream_seed, training_draw


@dataclass
class Job:
    """One meta-training job: which run, its inputs and outputs, and its settings ({seed, scenario,
    inversion, metatrain, evaluation, method})."""

    scenario: str
    method: str
    shot: int
    pool: Path
    pseudo: Path | None
    out: Path
    checkpoint: Path
    settings: dict
    data_root: Path = Path("data")
    script: Path = Path(__file__)  # digested with the dfml modules it runs: the code a checkpoint is valid for
    warm_start: Path | None = None  # invert_pool's inversion.json, with the pseudo data


def warm_start_seconds(record: Path) -> float:
    """The wall time of the warm-start inversion, from invert_pool's record of it: what a method that starts
    from its pseudo data is charged before its first meta-iteration."""
    try:
        return float(json.loads(Path(record).read_text())["warm_start_seconds"])
    except FileNotFoundError:
        raise SystemExit(f"{record}: no such warm-start record (invert_pool's inversion.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise SystemExit(f"{record}: no warm_start_seconds (written by an older invert_pool: rerun it)") from None


def job_settings(args) -> dict:
    """The job's settings: from --settings-json (Snakemake), or params.yaml keeping the one method trained."""
    settings = phase_settings(args, ("inversion", "metatrain", "evaluation", "methods"))
    if "methods" in settings:
        methods = settings.pop("methods")
        if args.method not in methods:
            raise SystemExit(f"unknown method {args.method!r}; defined in params: {sorted(methods)}")
        settings["method"] = method_for_shot(methods[args.method], args.shot)
    return settings


class CurveWriter:
    """Appends one CSV row per iteration to every path (the output curve and a copy next to the
    checkpoint, which survives when Snakemake deletes a failed job's outputs); on resume, both restart
    from the copy's rows up to the checkpoint's iteration. ``charged_seconds``: what the run is charged before
    its first meta-iteration (the warm start), written in the row of iteration 0; ``spent`` is the time budget
    used so far (those seconds for a fresh run; a resumed run's rows, the charge included)."""

    def __init__(self, paths: list[Path], resume_iteration: int | None, method_fields: tuple[str, ...],
                 protocols: list[str], charged_seconds: float | None = None):
        self.paths = paths
        self.method_fields = method_fields
        self.charged_seconds = charged_seconds
        self.fields = ["iteration", "meta_loss", "meta_accuracy", *method_fields, "seconds",
                       *[f"val_{name}" for name in protocols]]
        kept = []
        if resume_iteration is not None and paths[-1].is_file():
            with open(paths[-1]) as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= resume_iteration]
        self.spent = (sum(float(row["seconds"]) for row in kept if row.get("seconds")) if kept
                      else charged_seconds or 0.0)
        for path in paths:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(kept)

    def append(self, log: StepLog | None, val_accuracy: dict[str, float] | None) -> None:
        row = {"iteration": 0, "seconds": self._charged()} if log is None else {
            "iteration": log.iteration, "meta_loss": curve_value(log.meta_loss),
            "meta_accuracy": curve_value(log.meta_accuracy),
            **{name: curve_value(log.values[name]) for name in self.method_fields},
            "seconds": curve_value(log.seconds, 4)}
        row.update(self._val_cells(val_accuracy))
        for path in self.paths:
            with open(path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writerow(row)

    def add_evaluation(self, iteration: int, val_accuracy: dict[str, float]) -> None:
        """The meta-val scores of an iteration evaluated after its row was written (the last one a time budget
        keeps), into that row of every path."""
        for path in self.paths:
            with open(path) as handle:
                rows = list(csv.DictReader(handle))
            for row in rows:
                if int(row["iteration"]) == iteration:
                    row.update(self._val_cells(val_accuracy))
            atomic_write_text(path, to_csv_text(self.fields, rows))

    def _charged(self) -> float | str:
        return "" if self.charged_seconds is None else curve_value(float(self.charged_seconds), 4)

    def _val_cells(self, val_accuracy: dict[str, float] | None) -> dict:
        return {name: "" if val_accuracy is None else round(val_accuracy[name.removeprefix("val_")], 6)
                for name in self.fields if name.startswith("val_")}


def to_csv_text(fields: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def code_sha256(job: Job) -> str:
    """The digest of the job's code (dfml/codedeps.py): the script and the dfml modules it imports, of the
    methods only the job's own and of the fusions only the one its init can use; blind to comments, docstrings
    and layout. The same digest Snakemake reruns the job on (its ``code`` param)."""
    return _code_sha256(Path(job.script), job.settings["method"]["algorithm"], job.settings["metatrain"]["init"])


@functools.lru_cache(maxsize=4)
def _code_sha256(script: Path, algorithm: str, init: str) -> str:
    return code_digest(script, choices=metatrain_choices({"method": {"algorithm": algorithm},
                                                           "metatrain": {"init": init}}))


def run_fingerprint(job: Job) -> str:
    """What a checkpoint is valid for: settings, the (scenario, method, shot), the pseudo data and the code
    (a fix to the library must never be scored with a model trained before it)."""
    settings = {**job.settings, "metatrain": {k: v for k, v in job.settings["metatrain"].items() if k != "shots"}}
    digest = hashlib.sha256(Path(job.pseudo).read_bytes()).hexdigest() if job.pseudo is not None else None
    return json.dumps({"settings": settings, "scenario": job.scenario, "method": job.method, "shot": job.shot,
                       "pseudo_sha256": digest, "code_sha256": code_sha256(job)}, sort_keys=True)


def fingerprint_difference(old: str | None, new: str) -> str:
    """Which parts of two fingerprints differ, in words."""
    if old is None:
        return "it has no fingerprint"
    try:
        old_parts = json.loads(old)
    except json.JSONDecodeError:
        return "its fingerprint is unreadable"
    names = {"settings": "settings", "scenario": "scenario", "method": "method", "shot": "shot",
             "pseudo_sha256": "pseudo data", "code_sha256": "code (the script or a dfml module it runs)"}
    changed = [names.get(k, k) for k, v in json.loads(new).items() if old_parts.get(k) != v]
    return "written for another " + " and another ".join(changed) if changed else "fingerprint differs"


def seconds_per_iteration(curve_path: Path) -> float:
    """Mean wall time of a meta-iteration (the warm start charged in the row of iteration 0 is not one)."""
    with open(curve_path) as handle:
        seconds = [float(r["seconds"]) for r in csv.DictReader(handle) if r["seconds"] and int(r["iteration"]) > 0]
    return round(sum(seconds) / max(1, len(seconds)), 4)


def card_fields(job: Job, method: MetaTrainingMethod, init: str, protocol: str | None, best: dict,
                sec_per_iter: float | None, warm_start: float | None = None, selected_on: str = "meta_val") -> dict:
    """A meta-model's card: the run, the architecture, where it started, how it was chosen (``selected_on``:
    meta_val, or kept at an iteration), the cost, the code and the settings."""
    return {"format": META_MODEL_FORMAT, "scenario": job.scenario, "method": job.method, "shot": job.shot,
            "architecture": method.meta_model.config(), "init": init, "selected_on": selected_on, "protocol": protocol,
            "selected_iteration": best["iteration"], "meta_val_accuracy": best["accuracy"],
            "seconds_per_iteration": sec_per_iter, "warm_start_seconds": warm_start, "access": method.access,
            **method.card_fields(),
            "code_sha256": code_sha256(job), "settings": job.settings}


def write_card(out: Path, job: Job, method: MetaTrainingMethod, init: str, protocol: str, best: dict,
               sec_per_iter: float | None, warm_start: float | None = None) -> None:
    card = card_fields(job, method, init, protocol, best, sec_per_iter, warm_start)
    atomic_write_text(out / "meta_model.json", json.dumps(card, indent=2) + "\n")


def initial_meta_model(settings: dict, access: str, members: list, device) -> tuple[str, torch.nn.Module]:
    """``metatrain.init`` and the meta-model it gives. A black-box method cannot read the members' weights:
    ``auto`` means random for it and a fusion (average, ota) is refused."""
    mt, scenario = settings["metatrain"], settings["scenario"]
    if access == "black_box" and mt["init"] not in ("auto", "random"):
        raise SystemExit(f"metatrain.init {mt['init']!r} fuses the members' weights, which a black-box method "
                         "never sees: use init auto or random")
    init = "random" if access == "black_box" else choose_init(mt["init"], members, mt["meta_model"]["width"],
                                                              mt["meta_model"]["pooling"])
    model = build_meta_model(members, init, way=mt["way"], in_channels=scenario["channels"],
                             image_size=scenario["image_size"], width=mt["meta_model"]["width"],
                             pooling=mt["meta_model"]["pooling"], seed=training_draw(settings, META_MODEL_INIT))
    return init, model.to(device)


def run_job(job: Job, device: torch.device, log=lambda message: print(f"[metatrain] {message}", flush=True)) -> int:
    """Train, select and write; 0 when done, 143 when stopped by SIGTERM/SIGINT (checkpoint written)."""
    settings, scenario = job.settings, job.settings["scenario"]
    mt = method_metatrain(settings["metatrain"], settings["method"], job.shot)
    cls = method_class(settings["method"]["algorithm"])
    if cls.needs_pseudo_data and (job.pseudo is None or job.warm_start is None):
        raise SystemExit(f"method {job.method!r} ({cls.algorithm}) needs the warm-start pseudo data and the record of "
                         "its inversion: pass --pseudo and --warm-start (invert_pool's inversion.json)")
    warm_start = warm_start_seconds(job.warm_start) if cls.needs_pseudo_data else None
    out, checkpoint = Path(job.out), Path(job.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    try:
        check_access(job.scenario, scenario.get("access", "white_box"), job.method, cls.access)
    except AccessError as err:
        raise SystemExit(str(err)) from None
    try:
        pool = load_scenario_pool(job.pool, device)
    except ModelFileError as err:  # corrupt, truncated, pickled or disagreeing with its card: named, no traceback
        raise SystemExit(f"[metatrain] {err}") from None
    pseudo = PseudoDataset.load(job.pseudo, device=device) if cls.needs_pseudo_data else None
    init, model = initial_meta_model(settings, cls.access, [m.model for m in pool], device)
    n_members = len(pool)
    learner = make_learner(mt)
    stores = scenario_stores(scenario, job.data_root)
    black_box = cls.access == "black_box"
    apis = [BlackBoxAPI.from_member(member) for member in pool] if black_box else None
    protocols = evaluation_protocols(settings)
    training_val = None
    if cls.reads_metaval(settings["method"]):  # not data-free: episodes other than the selection's
        log(f"{job.method} reads real meta-val episodes during training: not data-free")
        training_val = episode_sets(stores, scenario, "meta_val", way=mt["way"], shot=job.shot,
                                    query=protocols[0].query, n_episodes=mt["val_episodes"],
                                    seed=stream_seed(settings, TRAINING_META_VAL_EPISODES))
    try:
        method = cls.build(MethodInputs(settings, job.shot, None if black_box else pool, pseudo, model, learner,
                                        device, seed=training_draw(settings, METHOD_DRAWS, job.shot), apis=apis,
                                        stores=stores, val_sets=training_val))
    except ValueError as err:
        raise SystemExit(f"method {job.method!r}: {err}") from None
    del pool  # a black-box method holds only its query functions

    val_sets = selection_sets(stores, settings, way=mt["way"], shot=job.shot, query=protocols[0].query,
                              n_episodes=mt["val_episodes"])
    best = BestModels([p.name for p in protocols])

    def save_best(name: str) -> None:
        (out / name).mkdir(exist_ok=True)
        atomic_save_tensors(best.entries[name]["model"], out / name / "meta_model.safetensors",
                            metadata={"format": META_MODEL_FORMAT})
        write_card(out / name, job, method, init, name, best.entries[name], None, warm_start)

    kept = KeptModels([i for i in mt.get("keep_checkpoints", []) if i <= mt["iterations"]], out / "kept",
                      checkpoint.with_name(checkpoint.stem + ".kept"))

    def keep(iteration: int) -> None:
        kept.keep(iteration, method.meta_model, card_fields(job, method, init, None, {"iteration": iteration,
                                                                                   "accuracy": None}, None,
                                                             warm_start, selected_on="kept"))

    fingerprint = run_fingerprint(job)
    resumed = resume(checkpoint, method, best, fingerprint, device, fingerprint_difference, log)
    if resumed:
        for name in best.accuracies():
            save_best(name)  # Snakemake deletes a failed job's outputs: restore the best models so far
        if kept:
            log(f"kept meta-models restored: iterations {kept.resume(method.iteration)}")
    else:
        kept.start_over()
    curve = CurveWriter([out / "curve.csv", checkpoint.with_name(checkpoint.stem + ".curve.csv")],
                        method.iteration if resumed else None, cls.curve_fields, [p.name for p in protocols],
                        charged_seconds=warm_start)
    schedule = Schedule(mt["iterations"], mt["eval_every"], mt["checkpoint_every"], mt.get("time_budget"),
                        kept.iterations)
    spent = budget_used(resumed, schedule, curve.spent)
    budget = "" if schedule.time_budget is None else f" or {schedule.time_budget:g} s of meta-iterations"
    if budget and warm_start is not None:
        budget += f" and warm start (its {warm_start:.1f} s charged first)"
    log(f"{job.scenario} {job.method} {job.shot}-shot: {method.describe()}, init {init}, {n_members} members, "
        f"{schedule.iterations} iterations{budget}, device {device}")
    start = time.perf_counter()
    progress = tqdm(total=schedule.iterations, initial=method.iteration, desc="meta-train", mininterval=2.0)
    try:
        best_accuracy = train(method, schedule, checkpoint_path=checkpoint, fingerprint=fingerprint,
                              evaluate=meta_val_evaluator(protocols, learner, method, val_sets, device), best=best,
                              on_log=curve.append, on_best=save_best, progress=progress, spent=spent,
                              on_late_evaluation=curve.add_evaluation, on_keep=keep, log=log)
    except StopRequested as stop:
        log(str(stop))
        return 143
    finally:
        progress.close()
    method.write_outputs(out)
    sec_per_iter = seconds_per_iteration(out / "curve.csv")
    for name in best.entries:
        write_card(out / name, job, method, init, name, best.entries[name], sec_per_iter, warm_start)
    chosen = ", ".join(f"{name} {acc:.4f} (iteration {best.entries[name]['iteration']})"
                       for name, acc in best_accuracy.items())
    if method.iteration < schedule.iterations:
        log(f"time budget of {schedule.time_budget:g} s spent after {method.iteration} meta-iterations "
            f"(pin iterations: {method.iteration} to replay this run exactly)")
    log(f"best meta-val accuracy per protocol: {chosen}; {time.perf_counter() - start:.1f}s -> {out}")
    if apis is not None:
        log(f"API budget used: {total_queries(apis):,} queries over {len(apis)} black-box members")
    return 0
