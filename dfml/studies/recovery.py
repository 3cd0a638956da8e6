"""FREE's speed claim on a toy: recovering a teacher's classes in a few steps from a meta-trained generator,
against a fresh generator trained from scratch and PURER's pixel inversion (METHODS 4.3: "about 20x faster").

    .venv/bin/python tools/bench_recovery.py --out results/bench_recovery     # bench.json, bench.png, bench.md

The toy family: 16x16 grey images of a bright Gaussian blob on noise, at one of 9 positions (the class). Each
teacher is a conv4 trained on ``way`` of the positions in its own order. FREE's meta-generator
(dfml/methods/free/meta_generator.py) is meta-trained on ``train_teachers`` teachers (events of 4 teachers, 5
adaptation steps each, the first-order meta-update), then the three recover every class of one held-out
teacher, ``per_class`` images each:

* ``free``: ``free_steps`` (5) adaptation steps from the meta-generator (no boundary term: no student here);
* ``free_long``: the same, ``scratch_steps`` steps (what meta-training buys at the from-scratch budget);
* ``fresh_long``: FREE's unconditional generator freshly initialised, ``scratch_steps`` steps (the same
  generator and loss without meta-training);
* ``scratch``: ``scratch_steps`` (200) steps of a freshly initialised generator (``recover_from_model``, bn 0:
  the same CE loss);
* ``pixels``: PURER's pixel inversion, the images themselves optimised (Adam lr 0.25 from N(0, 1); CE + 0.01 BN
  + 1e-4 TV + 1e-5 L2, jitter 2; dfml/inversion/losses.py), ``scratch_steps`` steps.

Every teacher forward pass is recorded (seconds since the method started, the teacher's accuracy on the batch
it saw, the CE over the recovered classes). The table gives, per method (median over ``repeats`` seeds), the
passes and seconds to first reach ``target_accuracy`` and ``target_loss`` (-: not within its budget), and the
values at its last step; the meta-training, which FREE pays once for all later recoveries, is costed beside.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dfml.inversion.losses import InversionWeights, jitter, member_inversion_terms, weighted_total
from dfml.inversion.recovery import RecoverySettings, recover_from_model, relative_labels
from dfml.methods.free.meta_generator import MetaGenerator
from dfml.models import build_model

SIZE, MEAN, STD = 16, (0.5,), (0.25,)
CENTRES = [(r, c) for r in (3.0, 8.0, 13.0) for c in (3.0, 8.0, 13.0)]


# -- the toy teachers ---------------------------------------------------------------------------------------------

def blob_images(positions: Tensor, rng: torch.Generator) -> Tensor:
    """A bright Gaussian blob at CENTRES[position] on uniform noise; pixels in [0, 1]."""
    grid = torch.arange(float(SIZE))
    centres = torch.tensor(CENTRES)[positions]
    rows = (grid[None, :] - centres[:, :1]) ** 2
    cols = (grid[None, :] - centres[:, 1:]) ** 2
    blob = torch.exp(-(rows[:, :, None] + cols[:, None, :]) / 6.0)
    return (0.8 * blob + 0.2 * torch.rand(len(positions), SIZE, SIZE, generator=rng)).unsqueeze(1)


def train_teacher(seed: int, way: int, steps: int = 80) -> nn.Module:
    """A conv4 telling ``way`` positions (drawn by ``seed``, in that order) apart."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(CENTRES), generator=rng)[:way]
    model = build_model("conv4", way, in_channels=1, image_size=SIZE, width=8).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        labels = torch.randint(0, way, (64,), generator=rng)
        loss = F.cross_entropy(model((blob_images(positions[labels], rng) - MEAN[0]) / STD[0]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


class Recorded(nn.Module):
    """The teacher, noting at each forward pass the time, its accuracy and CE on the recovered labels."""

    def __init__(self, model: nn.Module, labels: Tensor):
        super().__init__()
        self.model, self.labels, self.curve, self.start = model, labels, [], time.perf_counter()

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        held = logits.detach()
        self.curve.append({"seconds": time.perf_counter() - self.start,
                           "accuracy": float((held.argmax(1) == self.labels).float().mean()),
                           "loss": float(F.cross_entropy(held, self.labels))})
        return logits


@dataclasses.dataclass
class Family:
    """The teachers FREE's generator meta-trains on, the held-out one every method recovers, their input."""

    name: str
    training: list[nn.Module]
    target: nn.Module
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def toy_family(args) -> Family:
    teachers = [train_teacher(args.seed + 1 + i, args.way) for i in range(args.train_teachers + 1)]
    return Family(f"toy ({SIZE}x{SIZE} blobs at 9 positions, conv4 teachers)", teachers[1:], teachers[0], 1, SIZE,
                  MEAN, STD)


def pool_family(pool_dir: str, way: int) -> Family:
    """Member 0 of a pipeline pool held out; the members with ``way`` classes train the meta-generator."""
    from dfml.pool import load_pool

    members = load_pool(pool_dir)
    usable = [m for m in members if len(m.classes) >= way]
    if len(usable) < 2 or usable[0] is not members[0]:
        raise SystemExit(f"{pool_dir}: need member 0 and at least one other member with {way} classes")
    shapes = {(m.card["architecture"]["in_channels"], m.card["architecture"]["image_size"]) for m in usable}
    norms = {(tuple(m.card["normalization"]["mean"]), tuple(m.card["normalization"]["std"])) for m in usable}
    if len(shapes) > 1 or len(norms) > 1:
        raise SystemExit(f"{pool_dir}: members of one input shape and normalisation only (one dataset)")
    (channels, size), (mean, std) = shapes.pop(), norms.pop()
    archs = sorted({m.card["model"] for m in usable})
    return Family(f"{Path(pool_dir).name} pool ({len(usable)} {'/'.join(archs)} members, {channels}x{size}x{size})",
                  [m.model.eval() for m in usable[1:]], usable[0].model.eval(), channels, size, mean, std)


# -- the three recoveries -------------------------------------------------------------------------------------------

def meta_train(family: Family, args, rng: torch.Generator) -> tuple[MetaGenerator, dict]:
    settings = RecoverySettings(steps=args.free_steps, latent_dim=args.latent_dim,
                                generator_width=args.generator_width, bn=0.0)
    meta = MetaGenerator(family.channels, family.size, settings, args.meta_lr, rng)
    teachers = family.training
    start, passes, losses = time.perf_counter(), 0, []
    classes = list(range(args.way))
    for _ in tqdm(range(args.meta_events), desc="meta-training the generator", mininterval=5.0):
        drawn = torch.randint(len(teachers), (4,), generator=rng).tolist()
        adaptations = [meta.adapt(teachers[i], classes, args.per_class, mean=family.mean, std=family.std, rng=rng)
                       for i in drawn]
        meta.meta_update([a.gradients for a in adaptations])
        losses.append(sum(a.batch.loss for a in adaptations) / len(adaptations))
        passes += 4 * args.free_steps
    tenth = max(1, len(losses) // 10)  # the adapted batches' loss, first and last tenth of the events
    return meta, {"events": args.meta_events, "teacher_passes": passes, "seconds": time.perf_counter() - start,
                  "adapted_loss_first": statistics.mean(losses[:tenth]),
                  "adapted_loss_last": statistics.mean(losses[-tenth:])}


def recover_free(meta: MetaGenerator, teacher: Recorded, family: Family, args, rng: torch.Generator) -> None:
    meta.adapt(teacher, list(range(args.way)), args.per_class, mean=family.mean, std=family.std, rng=rng)


def recover_long(meta: MetaGenerator, teacher: Recorded, family: Family, args, rng: torch.Generator) -> None:
    longer = copy.copy(meta)  # adapt() copies the generator and leaves it alone: sharing it is safe
    longer.settings = dataclasses.replace(meta.settings, steps=args.scratch_steps)
    recover_free(longer, teacher, family, args, rng)


def recover_scratch(teacher: Recorded, family: Family, args, rng: torch.Generator) -> None:
    settings = RecoverySettings(steps=args.scratch_steps, latent_dim=args.latent_dim,
                                generator_width=args.generator_width, bn=0.0)
    recover_from_model(teacher, list(range(args.way)), args.per_class, channels=family.channels,
                       image_size=family.size, mean=family.mean, std=family.std, settings=settings, rng=rng)


def recover_pixels(teacher: Recorded, family: Family, args, rng: torch.Generator) -> None:
    weights = InversionWeights()
    labels = relative_labels(args.way, args.per_class)
    pixels = torch.randn(len(labels), family.channels, family.size, family.size, generator=rng).requires_grad_()
    optimizer = torch.optim.Adam([pixels], lr=0.25)
    for _ in range(args.scratch_steps):
        terms = member_inversion_terms(teacher, jitter(pixels, weights.jitter, rng), labels,
                                       weights.first_bn_multiplier)
        optimizer.zero_grad(set_to_none=True)
        weighted_total(*terms, weights).backward()
        optimizer.step()


# -- measuring --------------------------------------------------------------------------------------------------------

def first_reaching(curve: list[dict], reached) -> dict | None:
    for passes, point in enumerate(curve, start=1):
        if reached(point):
            return {"teacher_passes": passes, "seconds": point["seconds"]}
    return None


def summarise(runs: list[list[dict]], args) -> dict:
    def median(values):
        return statistics.median(values) if values else None

    summary = {"teacher_passes": len(runs[0]), "images_per_pass": args.way * args.per_class,
               "seconds": median([run[-1]["seconds"] for run in runs]),
               "final_accuracy": median([run[-1]["accuracy"] for run in runs]),
               "final_loss": median([run[-1]["loss"] for run in runs])}
    for name, reached in (("to_accuracy", lambda p: p["accuracy"] >= args.target_accuracy),
                          ("to_loss", lambda p: p["loss"] <= args.target_loss)):
        hits = [first_reaching(run, reached) for run in runs]
        summary[name] = {"reached": sum(h is not None for h in hits), "runs": len(runs),
                         "teacher_passes": median([h["teacher_passes"] for h in hits if h]),
                         "seconds": median([h["seconds"] for h in hits if h])}
    return summary


def markdown(result: dict, args) -> str:
    def cell(value, digits=2):
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [f"Recovering {args.way} classes x {args.per_class} images of a held-out teacher, {result['family']} "
             f"(median of "
             f"{args.repeats} seeds; targets: teacher accuracy >= {args.target_accuracy}, CE <= {args.target_loss}).",
             "", "| method | teacher passes | seconds | final accuracy | final CE | passes to accuracy | seconds to "
             "accuracy | passes to CE | seconds to CE |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["methods"].items():
        a, c = s["to_accuracy"], s["to_loss"]
        lines.append(f"| {name} | {s['teacher_passes']} | {cell(s['seconds'])} | {cell(s['final_accuracy'])} | "
                     f"{cell(s['final_loss'], 3)} | {cell(a['teacher_passes'])} ({a['reached']}/{a['runs']}) | "
                     f"{cell(a['seconds'])} | {cell(c['teacher_passes'])} ({c['reached']}/{c['runs']}) | "
                     f"{cell(c['seconds'])} |")
    meta = result["meta_training"]
    lines += ["", f"FREE's meta-training, paid once: {meta['events']} events, {meta['teacher_passes']} teacher passes, "
              f"{meta['seconds']:.1f} s on {meta['teachers']} other teachers; the adapted batches' CE went from "
              f"{meta['adapted_loss_first']:.3f} (first tenth of the events) to {meta['adapted_loss_last']:.3f} (last)."]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, curve in curves.items():
        passes = range(1, len(curve) + 1)
        axes[0].plot(passes, [p["accuracy"] for p in curve], marker="o" if len(curve) < 20 else None, label=name)
        axes[1].plot(passes, [p["loss"] for p in curve], marker="o" if len(curve) < 20 else None, label=name)
    for axis, label in zip(axes, ("teacher accuracy on the batch", "CE on the recovered classes")):
        axis.set_xscale("log")
        axis.set_xlabel("teacher forward passes")
        axis.set_ylabel(label)
    axes[1].set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    """The study with tools/bench_recovery.py's arguments: measure (or, with ``summarise``, rewrite the outputs
    from ``out``'s bench.json), write bench.json, bench.png and bench.md to ``out``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        result = json.loads((out / "bench.json").read_text())
        write_outputs(result, argparse.Namespace(**{**vars(args), **result["settings"]}), out)
        return 0
    torch.manual_seed(args.seed)
    family = pool_family(args.pool, args.way) if args.pool else toy_family(args)
    print(f"teachers: {family.name}")
    meta, meta_cost = meta_train(family, args, torch.Generator().manual_seed(args.seed))
    meta_cost["teachers"] = len(family.training)
    print(f"meta-training: {meta_cost}")
    target, labels = family.target, relative_labels(args.way, args.per_class)
    fresh = MetaGenerator(family.channels, family.size, meta.settings, args.meta_lr,
                          torch.Generator().manual_seed(args.seed + 1))
    runs = {"free": [], "free_long": [], "fresh_long": [], "scratch": [], "pixels": []}
    for repeat in range(args.repeats):
        for name, recover in (("free", lambda t, r: recover_free(meta, t, family, args, r)),
                              ("free_long", lambda t, r: recover_long(meta, t, family, args, r)),
                              ("fresh_long", lambda t, r: recover_long(fresh, t, family, args, r)),
                              ("scratch", lambda t, r: recover_scratch(t, family, args, r)),
                              ("pixels", lambda t, r: recover_pixels(t, family, args, r))):
            teacher = Recorded(target, labels)
            recover(teacher, torch.Generator().manual_seed(1000 + repeat))
            runs[name].append(teacher.curve)
            print(f"{name} seed {repeat}: {len(teacher.curve)} passes, {teacher.curve[-1]}")
    result = {"settings": vars(args), "family": family.name, "meta_training": meta_cost, "curves": runs}
    write_outputs(result, args, out)
    return 0


def speedups(runs: dict[str, list[list[dict]]]) -> dict:
    """FREE's claim as the paper states it: how many teacher passes each method needs to do as well as FREE's
    5 adaptation steps (its median final accuracy and CE), divided by FREE's passes."""
    free = runs["free"]
    level = {"accuracy": statistics.median(run[-1]["accuracy"] for run in free),
             "loss": statistics.median(run[-1]["loss"] for run in free)}
    passes = len(free[0])
    table = {}
    for name, curves in runs.items():
        if name == "free":
            continue
        row = {}
        for target, reached in (("accuracy", lambda p: p["accuracy"] >= level["accuracy"]),
                                ("loss", lambda p: p["loss"] <= level["loss"])):
            hits = [first_reaching(run, reached) for run in curves]
            found = [h["teacher_passes"] for h in hits if h]
            row[target] = {"reached": len(found), "runs": len(curves),
                           "teacher_passes": statistics.median(found) if found else None,
                           "ratio": statistics.median(found) / passes if found else None}
        table[name] = row
    return {"free_level": level, "free_passes": passes, "methods": table}


def speedup_markdown(speed: dict) -> str:
    level = speed["free_level"]
    lines = ["", f"Passes to do as well as FREE's {speed['free_passes']} steps (median final teacher accuracy "
             f"{level['accuracy']:.2f}, CE {level['loss']:.3f}), and that count / {speed['free_passes']} (the "
             "paper claims about 20x):", "", "| method | passes to its accuracy | ratio | passes to its CE | ratio |",
             "|---|---|---|---|---|"]
    for name, row in speed["methods"].items():
        cells = []
        for target in ("accuracy", "loss"):
            t = row[target]
            cells += ["-" if t["teacher_passes"] is None else f"{t['teacher_passes']:g} ({t['reached']}/{t['runs']})",
                      "-" if t["ratio"] is None else f"{t['ratio']:.1f}x"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, args, out: Path) -> None:
    """bench.json, bench.png, bench.md from the recorded curves (also what --summarise rewrites)."""
    runs = result["curves"]
    result["methods"] = {name: summarise(curves, args) for name, curves in runs.items()}
    result["speedup"] = speedups(runs)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot({name: curves[0] for name, curves in runs.items()}, out / "bench.png")
    table = markdown(result, args) + speedup_markdown(result["speedup"])
    (out / "bench.md").write_text(table)
    print(table)

