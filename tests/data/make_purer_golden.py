"""Writes tests/data/purer_golden.safetensors: a tiny deterministic PURER meta-training (synthetic conv4 pool,
ECI and EI), run through the meta-training path of the commit it is run on. tests/test_methods.py asserts that
the shared loop with PurerMethod reproduces it exactly (same curve, same meta-models, same pseudo data).

Run (CPU, one thread): .venv/bin/python tests/data/make_purer_golden.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dfml.evaluate import learner_scorer  # noqa: E402
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset  # noqa: E402
from dfml.meta import build_learner  # noqa: E402
from dfml.methods.purer import PurerSettings, PurerTrainer, build_meta_model, train  # noqa: E402
from dfml.models import build_model  # noqa: E402

WAY, SHOT, QUERY, SIZE = 3, 1, 2, 16
ITERATIONS, EVAL_EVERY, CHECKPOINT_EVERY = 9, 3, 4
PROTOCOLS = {"test1": 1, "test2": 2}
VARIANTS = {"eci": {"eci": True, "warmup": 2, "patience": 1}, "ei": {"eci": False}}
OUT = Path(__file__).resolve().parent / "purer_golden.safetensors"


def make_pool():
    torch.manual_seed(0)
    members = []
    for m in range(3):
        model = build_model("conv4", 3, 1, SIZE, width=4)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
        members.append((model.eval(), [f"c{m * 3 + k}" for k in range(3)]))
    return members


def val_episodes():
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(WAY)
    return [SimpleNamespace(support_x=torch.randn(WAY * SHOT, 1, SIZE, SIZE, generator=gen),
                            support_y=labels.repeat_interleave(SHOT),
                            query_x=torch.randn(WAY * QUERY, 1, SIZE, SIZE, generator=gen),
                            query_y=labels.repeat_interleave(QUERY)) for _ in range(4)]


def run(variant: dict, checkpoint: Path):
    members = make_pool()
    pseudo = PseudoDataset.for_pool([c for _, c in members], (1, SIZE, SIZE), shots=SHOT, queries=QUERY, seed=3)
    engine = InversionEngine(members, pseudo, InversionWeights(), mode="sequential")
    model = build_meta_model([m for m, _ in members], "average", way=WAY, in_channels=1, image_size=SIZE, width=4,
                             seed=5)
    learner = build_learner("maml", inner_lr=0.1)
    settings = PurerSettings(way=WAY, shot=SHOT, query=QUERY, meta_batch=2, iterations=ITERATIONS,
                             eval_every=EVAL_EVERY, checkpoint_every=CHECKPOINT_EVERY, **variant)
    trainer = PurerTrainer(engine, pseudo, model, learner, settings, seed=11)
    episodes = val_episodes()

    def evaluate():
        return {name: sum(learner_scorer(learner, model, trainer.params, steps=steps)(e) for e in episodes)
                / len(episodes) for name, steps in PROTOCOLS.items()}

    rows, best = [], {}

    def on_log(log, val):
        row = {"iteration": 0} if log is None else {
            k: (int(v) if isinstance(v, bool) else v) for k, v in vars(log).items() if k not in ("seconds", "extra")}
        row.update({f"val_{k}": v for k, v in (val or {}).items()})
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})

    def on_best(name, accuracy):
        best[name] = {"iteration": trainer.iteration, "accuracy": accuracy,
                      "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    best_accuracy = train(trainer, checkpoint_path=checkpoint, evaluate=evaluate, on_log=on_log, on_best=on_best)
    assert best_accuracy == {k: v["accuracy"] for k, v in best.items()}
    return trainer, rows, best


def main():
    torch.set_num_threads(1)
    tensors, meta = {}, {}
    for name, variant in VARIANTS.items():
        trainer, rows, best = run(variant, OUT.with_name(f"_{name}_checkpoint.safetensors"))
        OUT.with_name(f"_{name}_checkpoint.safetensors").unlink()
        tensors.update({f"{name}/final/{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()})
        tensors[f"{name}/pseudo"] = trainer.pseudo.images.detach().clone()
        for protocol, entry in best.items():
            tensors.update({f"{name}/best/{protocol}/{k}": v for k, v in entry["model"].items()})
        meta[name] = {"curve": rows, "best": {p: {"iteration": e["iteration"], "accuracy": e["accuracy"]}
                                              for p, e in best.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata={"runs": json.dumps(meta)})
    print(json.dumps(meta, indent=1)[:3000])


if __name__ == "__main__":
    main()
