"""What the generator-based methods (BiDf-MKD, TACO) share: their state (meta-model, optimiser, task memory,
event trigger, RNG) with its checkpoint, how they are built from the job, when to recover new tasks, and the
distillation loss from a pool member to the meta-model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from dfml.data.store import atomic_write_text
from dfml.inversion.recovery import RecoverySettings
from dfml.meta import Learner
from dfml.meta.memory import TaskMemory
from dfml.methods.base import EpisodeSettings, MetaTrainingMethod, MethodInputs, check_finite


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), temperature 1, mean over images (log-probabilities on both sides)."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                    reduction="batchmean", log_target=True)


@dataclass
class GeneratorRecoverySettings(EpisodeSettings):
    """The episodes and a fresh generator's recovery per task (CE + BN statistics), as TACO and TGR set it."""

    recovery_steps: int = 200
    generator_lr: float = 1e-3
    latent_dim: int = 256
    generator_width: int = 64
    bn: float = 1.0
    flip: bool = False  # the pool's members are pretrained without flips (the official code flips)

    def recovery(self) -> RecoverySettings:
        return RecoverySettings(steps=self.recovery_steps, lr=self.generator_lr, latent_dim=self.latent_dim,
                                generator_width=self.generator_width, bn=self.bn, flip=self.flip)


class GenerationTrigger:
    """Due on the first iteration, then after ``interval`` iterations without a new best meta-batch accuracy
    (the best is forgotten at every event: the new tasks set a new level)."""

    def __init__(self, interval: int):
        self.interval, self.stagnant, self.best, self.due = interval, 0, -math.inf, True

    def observe(self, accuracy: float, generated: bool) -> None:
        if generated:
            self.best, self.stagnant = -math.inf, 0
        if accuracy > self.best:
            self.best, self.stagnant = accuracy, 0
        else:
            self.stagnant += 1
        self.due = self.stagnant >= self.interval

    def state_dict(self) -> dict:
        return {"stagnant": self.stagnant, "best": self.best, "due": self.due}

    def load_state_dict(self, state: dict) -> None:
        self.stagnant, self.best, self.due = state["stagnant"], state["best"], state["due"]


class GenerativeMethod(MetaTrainingMethod):
    """A method that recovers tasks from the pool's members into a task memory and replays them.

    ``members``: the white-box pool members, or the black-box APIs for a black-box method (``access``);
    ``normalization``: dataset -> (mean, std) of its store, what each member's inputs are normalised with;
    ``val_sets``: real meta-val episodes, only for settings that read them (``reads_metaval``).
    ``draws[i]`` counts the generation events that recovered a task from member i; ``members.json`` (written
    at the end) says how each member was used. Subclasses set ``settings_class`` (an :class:`EpisodeSettings` with ``memory_batches`` and
    ``generate_interval``) and supply ``step``; :meth:`extra_state` / :meth:`load_extra_state` add their own
    state to the checkpoint."""

    needs_pseudo_data = False
    settings_class: ClassVar[type[EpisodeSettings]]

    def __init__(self, members: list, normalization: dict[str, tuple[list, list]], channels: int, image_size: int,
                 meta_model: torch.nn.Module, learner: Learner, settings, device, seed: int,
                 val_sets: list | None = None):
        self.val_sets = val_sets
        self.draws = [0] * len(members)
        self.members, self.normalization, self.channels, self.image_size = members, normalization, channels, image_size
        self.meta_model, self.learner, self.settings, self.device = meta_model, learner, settings, device
        self._params = dict(meta_model.named_parameters())
        self.optimizer = torch.optim.Adam(self._params.values(), lr=settings.outer_lr)
        self.memory = TaskMemory(settings.memory_batches)
        self.trigger = GenerationTrigger(settings.generate_interval)
        self.rng = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.events = 0

    @classmethod
    def build(cls, inputs: MethodInputs) -> GenerativeMethod:
        scenario = inputs.settings["scenario"]
        normalization = {name: (list(store.info.mean), list(store.info.std)) for name, store in inputs.stores.items()}
        members = inputs.apis if cls.access == "black_box" else inputs.pool
        return cls(members, normalization, scenario["channels"], scenario["image_size"], inputs.meta_model,
                   inputs.learner, cls.settings_class.from_job(inputs.settings, inputs.shot), inputs.device,
                   inputs.seed, inputs.val_sets)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "events": self.events,
                "meta_model": {k: v.detach().clone() for k, v in self._params.items()},
                "optimizer": self.optimizer.state_dict(), "rng": self.rng.get_state(),
                "memory": self.memory.state_dict(), "trigger": self.trigger.state_dict(), "draws": list(self.draws),
                **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.events = state["iteration"], state["events"]
        with torch.no_grad():
            for name, value in state["meta_model"].items():
                self._params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"].cpu())
        self.memory.load_state_dict(state["memory"])
        self.trigger.load_state_dict(state["trigger"])
        self.draws = [int(n) for n in state["draws"]]
        self.load_extra_state(state)

    def memory_task_losses(self, count: int) -> tuple[list[torch.Tensor], list[float]]:
        """``count`` replay tasks drawn from the memory: the learner's loss and accuracy on each."""
        s = self.settings
        losses, accuracies = [], []
        for _ in range(count):
            task, _ = self.memory.sample_task(s.way, s.shot, s.query, self.rng, self.device)
            loss, accuracy = self.learner.task_loss(self.meta_model, self._params, task, training=True)
            losses.append(loss)
            accuracies.append(float(accuracy))
        return losses, accuracies

    def meta_step(self, total: torch.Tensor) -> None:
        """One step of the meta-model's optimiser on ``total``; a nan or inf stops the run."""
        check_finite(total, self.iteration, "meta-batch loss")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` saved."""

    def card_fields(self) -> dict:
        return {"generation_events": self.events}

    def member_usage(self) -> dict:
        """How members were chosen and each one's final sampling probability (default: uniformly)."""
        n = len(self.members)
        return {"selection": "uniform", "reward": None, "probabilities": [1.0 / n] * n, "logits": [None] * n}

    def write_outputs(self, out: Path) -> None:
        """``members.json``: per member (pool order, ``member_<i>.json``), its draws and final probability."""
        usage = self.member_usage()
        members = [{"index": i, "card": f"member_{i}.json", "draws": self.draws[i],
                    "probability": round(float(p), 6), "logit": None if w is None else round(float(w), 6)}
                   for i, (p, w) in enumerate(zip(usage["probabilities"], usage["logits"]))]
        record = {"algorithm": self.algorithm, "selection": usage["selection"], "reward": usage["reward"],
                  "data_free": self.val_sets is None, "events": self.events, "members": members}
        atomic_write_text(Path(out) / "members.json", json.dumps(record, indent=2) + "\n")
