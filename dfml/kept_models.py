"""Meta-models kept at chosen meta-iterations (``metatrain.keep_checkpoints``), for a study of accuracy against
compute (configs/scaling.yaml): each is written as ``iter<N>/meta_model.safetensors`` with its card
``iter<N>/meta_model.json``, in the job's ``kept/`` output and in a store beside the checkpoint. The store is
what survives a killed job (Snakemake deletes a failed job's outputs, not its checkpoint): a resumed run copies
the models kept up to its checkpoint's iteration back into ``kept/`` and drops any kept after it (the resumed
run writes them again, identically), and a run that starts over empties it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dfml.data.store import atomic_save_tensors, atomic_write_text
from dfml.models.card import META_MODEL_FORMAT


def kept_name(iteration: int) -> str:
    return f"iter{iteration}"


class KeptModels:
    """Keeps the meta-model at ``iterations`` (those a job reaches) in ``out`` and ``store``."""

    def __init__(self, iterations, out: Path, store: Path):
        self.iterations = frozenset(int(i) for i in iterations)
        self.out, self.store = Path(out), Path(store)

    def __bool__(self) -> bool:
        return bool(self.iterations)

    def start_over(self) -> None:
        """A fresh run: nothing kept by an earlier run (other settings, code or data) may remain."""
        for folder in (self.store, self.out):
            shutil.rmtree(folder, ignore_errors=True)
        if self:
            self.out.mkdir(parents=True, exist_ok=True)

    def resume(self, iteration: int) -> list[int]:
        """Restore into ``out`` the models kept up to ``iteration``; returns their iterations."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        restored = []
        for folder in sorted(self.store.glob("iter*")) if self.store.is_dir() else []:
            kept_at = int(folder.name.removeprefix("iter"))
            if kept_at > iteration:
                shutil.rmtree(folder)
            else:
                shutil.copytree(folder, self.out / folder.name)
                restored.append(kept_at)
        return sorted(restored)

    def keeps(self, iteration: int) -> bool:
        return iteration in self.iterations

    def keep(self, iteration: int, model: torch.nn.Module, card: dict) -> None:
        """Write the model of ``iteration`` and its card (``card`` plus the iteration) to the store, then ``out``."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        text = json.dumps({**card, "kept_iteration": iteration}, indent=2) + "\n"
        for root in (self.store, self.out):
            folder = root / kept_name(iteration)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(tensors, folder / "meta_model.safetensors", metadata={"format": META_MODEL_FORMAT})
            atomic_write_text(folder / "meta_model.json", text)
