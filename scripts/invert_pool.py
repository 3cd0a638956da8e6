"""Warm-start inversion of a scenario's whole pool into its learnable pseudo dataset.

Writes <out>/pseudo.safetensors (images + Adam state), <out>/inversion_curve.csv,
<out>/inversion.json (final terms, teacher agreement per member, timing: ``warm_start_seconds``, the wall time
of the inversion steps, is charged to every method that starts from the pseudo data) and <out>/pseudo_grid.png.
The wall time stays out of pseudo.safetensors, whose bytes are the same on every run.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch starts its threads)

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dfml.config import add_phase_arguments, phase_settings
from dfml.data.grid import save_array_grid
from dfml.data.store import atomic_write_text
from dfml.device import pick_device, set_threads
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.inversion.pseudo_data import gather_member_view
from dfml.scenario import inversion_members, load_scenario_pool, pseudo_to_pictures, scenario_stores
from dfml.seeds import WARM_START_IMAGES, WARM_START_JITTER, training_draw

TERMS = ("total", "ce", "bn", "tv", "l2")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--pool", required=True, help="pool folder (results/pool/<scenario>)")
    parser.add_argument("--out", required=True, help="output folder (results/synthetic/<scenario>)")
    add_phase_arguments(parser, "{seed, scenario, inversion}")
    return parser


@torch.no_grad()
def teacher_agreement(engine_members, pseudo: PseudoDataset) -> list[float]:
    """Fraction of each member's pseudo images that the member classifies as their target class."""
    scores = []
    for model, classes in engine_members:
        images, targets = gather_member_view(pseudo.images, pseudo.class_indices(classes))
        scores.append(float((model(images).argmax(1) == targets.to(images.device)).float().mean()))
    return scores


def main(args: argparse.Namespace) -> int:
    settings = phase_settings(args, ("inversion",))
    set_threads(args.threads)
    device = pick_device()
    scenario, inv = settings["scenario"], settings["inversion"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = load_scenario_pool(args.pool, device)
    members = inversion_members(pool)
    shape = (scenario["channels"], scenario["image_size"], scenario["image_size"])
    pseudo = PseudoDataset.for_pool([classes for _, classes in members], shape, shots=inv["slots_per_class"], queries=0,
                                    seed=training_draw(settings, WARM_START_IMAGES), lr=inv["lr"], device=device)
    engine = InversionEngine(members, pseudo, InversionWeights(**inv["weights"]), mode=inv["engine"], device=device,
                             member_weighting=inv.get("member_weighting", "official"))
    generator = torch.Generator().manual_seed(training_draw(settings, WARM_START_JITTER))
    print(f"[invert] {len(members)} members, {pseudo.num_classes} pseudo classes x {pseudo.slots_per_class} slots "
          f"{shape}, engine path {engine.path(torch.device(device))} on {device}",
          flush=True)
    rows, start = [], time.perf_counter()
    for step in tqdm(range(1, inv["warm_start_steps"] + 1), desc="inversion", mininterval=2.0):
        loss, terms = engine.loss(pseudo.images, generator)
        (grad,) = torch.autograd.grad(loss, [pseudo.images])
        pseudo.optimizer.zero_grad(set_to_none=True)
        pseudo.images.grad = grad
        pseudo.optimizer.step()
        pseudo.images.grad = None
        rows.append({"step": step, **{t: round(float(terms[t].mean()), 6) for t in TERMS}})
    seconds = time.perf_counter() - start
    agreement = teacher_agreement(members, pseudo)
    pseudo.save(out / "pseudo.safetensors")
    write_curve(out / "inversion_curve.csv", rows)
    summary = {"members": len(members), "pseudo_classes": pseudo.num_classes, "slots_per_class": pseudo.slots_per_class,
               "member_weighting": engine.member_weighting,
               "steps": inv["warm_start_steps"], "seconds": round(seconds, 2),
               "warm_start_seconds": round(seconds, 4),  # charged to the methods on the pseudo data (metatrain)
               "seconds_per_step": round(seconds / max(1, inv["warm_start_steps"]), 4),
               "final_terms_mean_per_member": rows[-1] if rows else {},
               "teacher_agreement": [round(a, 4) for a in agreement],
               "mean_teacher_agreement": round(sum(agreement) / len(agreement), 4)}
    atomic_write_text(out / "inversion.json", json.dumps(summary, indent=2) + "\n")
    stores = scenario_stores(scenario, args.data_root)
    shown = pseudo.class_names[:: max(1, pseudo.num_classes // 10)][:10]
    save_array_grid(pseudo_to_pictures(pseudo, stores, shown, 8), shown, out / "pseudo_grid.png")
    print(f"[invert] {inv['warm_start_steps']} steps in {seconds:.1f}s; mean teacher agreement "
          f"{summary['mean_teacher_agreement']:.3f} -> {out}", flush=True)
    return 0


def write_curve(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", *TERMS])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
