"""Meta-train one (scenario, method, shot) with PURER's episode curriculum inversion; resumable.

Writes to <out>/: per evaluation protocol <protocol>/meta_model.safetensors (the best on meta-val under
that protocol) + <protocol>/meta_model.json (its card), curve.csv (per iteration: meta-train
loss/accuracy, inversion terms, ECI events, meta-val accuracy per protocol when evaluated),
pseudo_final.safetensors. The resumable checkpoint lives in
<checkpoint> and is reused when the job is rerun after a kill (SIGTERM: a final checkpoint, exit
143; SIGKILL: the last periodic one) by the same code. It holds the best model and sits next to a copy of the curve,
so a rerun restores outputs that Snakemake deleted when the killed job failed. A checkpoint written
for other settings, another pseudo dataset or by other code (this script or any dfml file it imports,
dfml/codedeps.py) is ignored: the run starts over.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
import csv
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dfml.codedeps import code_digest
from dfml.config import add_phase_arguments, phase_settings
from dfml.data.store import atomic_save_tensors, atomic_write_text
from dfml.device import pick_device, set_threads
from dfml.evaluate import episode_accuracies, learner_scorer, mean_ci95
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.methods.purer import PurerSettings, PurerTrainer, StopRequested, build_meta_model, resume_state, train
from dfml.models.card import META_MODEL_FORMAT
from dfml.models.fusion import can_fuse
from dfml.pool import derive_seed
from dfml.protocol import evaluation_protocols, make_learner
from dfml.scenario import episode_sets, inversion_members, load_scenario_pool, scenario_stores

CURVE_FIELDS = ["iteration", "meta_loss", "meta_accuracy", "inversion_loss", "inversion_ce", "inversion_bn",
                "adversarial", "adversarial_outer_loss", "eci_armed", "seconds"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--method", required=True, help="a key of params.yaml methods (purer, purer_ei, ...)")
    parser.add_argument("--shot", type=int, required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--pseudo", required=True, help="warm-started pseudo dataset (invert_pool output)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", required=True, help="resumable checkpoint file")
    add_phase_arguments(parser, "{seed, scenario, inversion, metatrain, evaluation, method}")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    settings = phase_settings(args, ("inversion", "metatrain", "evaluation", "methods"))
    if "methods" in settings:  # from params.yaml: keep the one method this job trains
        methods = settings.pop("methods")
        if args.method not in methods:
            raise SystemExit(f"unknown method {args.method!r}; defined in params: {sorted(methods)}")
        settings["method"] = methods[args.method]
    return settings


def purer_settings(settings: dict, shot: int) -> PurerSettings:
    mt, method = settings["metatrain"], settings["method"]
    return PurerSettings(way=mt["way"], shot=shot, query=mt["query"], meta_batch=mt["meta_batch"],
                         outer_lr=mt["outer_lr"], iterations=mt["iterations"], eci=method.get("eci", True),
                         lambda_adv=method.get("lambda_adv", 10.0), warmup=method.get("warmup", 4000),
                         patience=method.get("patience", 6), eval_every=mt["eval_every"],
                         checkpoint_every=mt["checkpoint_every"],
                         adversarial_step=method.get("adversarial_step", "shared"),
                         adversarial_lr=method.get("adversarial_lr"))


def choose_init(requested: str, pool, meta_cfg: dict) -> str:
    if requested != "auto":
        return requested
    members = [(m.model.config()["name"], m.model.config()["width"]) for m in pool]
    return "average" if can_fuse(members, meta_cfg["width"], meta_cfg["pooling"]) else "random"


class CurveWriter:
    """Appends one CSV row per iteration to every path (the output curve and a copy next to the
    checkpoint, which survives when Snakemake deletes a failed job's outputs); on resume, both restart
    from the copy's rows up to the checkpoint's iteration."""

    def __init__(self, paths: list[Path], resume_iteration: int | None, protocols: list[str]):
        self.paths = paths
        self.fields = CURVE_FIELDS + [f"val_{name}" for name in protocols]
        kept = []
        if resume_iteration is not None and paths[-1].is_file():
            with open(paths[-1]) as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= resume_iteration]
        for path in paths:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(kept)

    def append(self, log, val_accuracy: dict[str, float] | None) -> None:
        row = {"iteration": 0} if log is None else {
            "iteration": log.iteration, "meta_loss": round(log.meta_loss, 6),
            "meta_accuracy": round(log.meta_accuracy, 6), "inversion_loss": round(log.inversion_loss, 6),
            "inversion_ce": round(log.inversion_ce, 6), "inversion_bn": round(log.inversion_bn, 6),
            "adversarial": int(log.adversarial),
            "adversarial_outer_loss": "" if log.adversarial_outer_loss != log.adversarial_outer_loss
            else round(log.adversarial_outer_loss, 6),
            "eci_armed": int(log.eci_armed), "seconds": round(log.seconds, 4)}
        for field in self.fields[len(CURVE_FIELDS):]:
            row[field] = "" if val_accuracy is None else round(val_accuracy[field.removeprefix("val_")], 6)
        for path in self.paths:
            with open(path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writerow(row)


@functools.lru_cache(maxsize=1)
def code_sha256() -> str:
    """This script and every dfml file it imports, hashed once per process (dfml/codedeps.py)."""
    return code_digest(__file__)


def run_fingerprint(settings: dict, args: argparse.Namespace) -> str:
    """What a checkpoint is valid for: settings, the (scenario, method, shot), the pseudo data and the code
    (this script and every dfml file it imports: a fix to the library must never be scored with a model
    trained before it)."""
    settings = {**settings, "metatrain": {k: v for k, v in settings["metatrain"].items() if k != "shots"}}
    digest = hashlib.sha256(Path(args.pseudo).read_bytes()).hexdigest()
    return json.dumps({"settings": settings, "scenario": args.scenario, "method": args.method, "shot": args.shot,
                       "pseudo_sha256": digest, "code_sha256": code_sha256()}, sort_keys=True)


def fingerprint_difference(old: str | None, new: str) -> str:
    """Which parts of two fingerprints differ, in words."""
    if old is None:
        return "it has no fingerprint"
    try:
        old_parts = json.loads(old)
    except json.JSONDecodeError:
        return "its fingerprint is unreadable"
    names = {"settings": "settings", "scenario": "scenario", "method": "method", "shot": "shot",
             "pseudo_sha256": "pseudo data", "code_sha256": "code (the script or a dfml file it imports)"}
    changed = [names.get(k, k) for k, v in json.loads(new).items() if old_parts.get(k) != v]
    return "written for another " + " and another ".join(changed) if changed else "fingerprint differs"


def main(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    set_threads(args.threads)
    device = pick_device()
    scenario, mt = settings["scenario"], settings["metatrain"]
    s = purer_settings(settings, args.shot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    pool = load_scenario_pool(args.pool, device)
    pseudo = PseudoDataset.load(args.pseudo, device=device)
    if pseudo.slots_per_class < args.shot + mt["query"]:
        raise SystemExit(f"pseudo data has {pseudo.slots_per_class} slots per class, a {args.shot}-shot "
                         f"{mt['query']}-query task needs {args.shot + mt['query']}: raise inversion.slots_per_class")
    engine = InversionEngine(inversion_members(pool), pseudo, InversionWeights(**settings["inversion"]["weights"]),
                             mode=settings["inversion"]["engine"], device=device)
    init = choose_init(mt["init"], pool, mt["meta_model"])
    model = build_meta_model([m.model for m in pool], init, way=mt["way"], in_channels=scenario["channels"],
                             image_size=scenario["image_size"], width=mt["meta_model"]["width"],
                             pooling=mt["meta_model"]["pooling"], seed=derive_seed(settings["seed"], 201)).to(device)
    learner = make_learner(mt)
    trainer = PurerTrainer(engine, pseudo, model, learner, s, seed=derive_seed(settings["seed"], 202, args.shot))

    protocols = evaluation_protocols(settings)
    stores = scenario_stores(scenario, args.data_root)
    val_sets = episode_sets(stores, scenario, "meta_val", way=mt["way"], shot=args.shot, query=protocols[0].query,
                            n_episodes=mt["val_episodes"], seed=derive_seed(settings["seed"], 301))

    def evaluate() -> dict[str, float]:
        scores = {}
        for protocol in protocols:
            scorer = learner_scorer(learner, model, trainer.params, steps=protocol.test_steps)
            scores[protocol.name] = sum(mean_ci95(episode_accuracies(scorer, es, device))[0]
                                        for es in val_sets) / len(val_sets)
        return scores

    best = {p.name: {"iteration": 0, "accuracy": None, "model": None} for p in protocols}

    def save_best(name: str) -> None:
        (out / name).mkdir(exist_ok=True)
        atomic_save_tensors(best[name]["model"], out / name / "meta_model.safetensors",
                            metadata={"format": META_MODEL_FORMAT})
        write_card(out / name, model, init, settings, args, name, best[name], None)

    def on_best(name: str, accuracy: float) -> None:
        best[name].update(iteration=trainer.iteration, accuracy=accuracy,
                          model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        save_best(name)

    fingerprint = run_fingerprint(settings, args)

    def extra_state() -> dict:
        return {"fingerprint": fingerprint,
                "best": {name: {"iteration": b["iteration"], "model": b["model"]} for name, b in best.items()}}

    state = resume_state(checkpoint, device)
    if state is not None and state.get("fingerprint") != fingerprint:
        print(f"[metatrain] ignoring {checkpoint}: {fingerprint_difference(state.get('fingerprint'), fingerprint)}; "
              f"starting over", flush=True)
        state = None
    best_accuracy = {}
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        best_accuracy = state["best_accuracy"]
        for name, saved in state["best"].items():
            best[name].update(iteration=saved["iteration"], accuracy=best_accuracy[name],
                              model={k: v.cpu() for k, v in saved["model"].items()})
            save_best(name)  # Snakemake deletes a failed job's outputs: restore the best models so far
        print(f"[metatrain] resuming from {checkpoint} at meta-iteration {trainer.iteration}", flush=True)
    curve = CurveWriter([out / "curve.csv", checkpoint.with_name(checkpoint.stem + ".curve.csv")],
                        trainer.iteration if state is not None else None, [p.name for p in protocols])
    print(f"[metatrain] {args.scenario} {args.method} {args.shot}-shot: init {init}, {len(pool)} teachers, "
          f"{s.iterations} iterations, ECI {'on' if s.eci else 'off'}, device {device}", flush=True)
    start = time.perf_counter()
    progress = tqdm(total=s.iterations, initial=trainer.iteration, desc="meta-train", mininterval=2.0)
    try:
        best_accuracy = train(trainer, checkpoint_path=checkpoint, evaluate=evaluate, on_log=curve.append,
                              on_best=on_best, best_accuracy=best_accuracy, progress=progress,
                              extra_state=extra_state)
    except StopRequested as stop:
        print(f"[metatrain] {stop}", flush=True)
        return 143
    finally:
        progress.close()
    pseudo.save(out / "pseudo_final.safetensors")
    sec_per_iter = seconds_per_iteration(out / "curve.csv")
    for name in best:
        write_card(out / name, model, init, settings, args, name, best[name], sec_per_iter)
    chosen = ", ".join(f"{name} {acc:.4f} (iteration {best[name]['iteration']})" for name, acc in best_accuracy.items())
    print(f"[metatrain] best meta-val accuracy per protocol: {chosen}; {time.perf_counter() - start:.1f}s "
          f"-> {out}", flush=True)
    return 0


def seconds_per_iteration(curve_path: Path) -> float:
    with open(curve_path) as handle:
        seconds = [float(r["seconds"]) for r in csv.DictReader(handle) if r["seconds"]]
    return round(sum(seconds) / max(1, len(seconds)), 4)


def write_card(out: Path, model, init: str, settings: dict, args, protocol: str, best: dict,
               sec_per_iter: float | None) -> None:
    card = {"format": META_MODEL_FORMAT, "scenario": args.scenario, "method": args.method, "shot": args.shot,
            "architecture": model.config(), "init": init, "selected_on": "meta_val", "protocol": protocol,
            "selected_iteration": best["iteration"], "meta_val_accuracy": best["accuracy"],
            "seconds_per_iteration": sec_per_iter, "code_sha256": code_sha256(), "settings": settings}
    atomic_write_text(out / "meta_model.json", json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
