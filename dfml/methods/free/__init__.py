"""FREE (CVPR 2024, "Faster and Better Data-Free Meta-Learning"; METHODS.md 4.3).

White-box members, a meta-generator that is never reset, a task memory. One meta-iteration:

1. **Generation event** (the first ``warmup_events`` iterations, then after ``generate_interval`` iterations
   without a better meta-batch accuracy, or while the memory holds fewer than ``way`` classes): ``teachers``
   members are drawn uniformly (with replacement, each one its own module, however heterogeneous the pool);
   each recovers ``per_class`` images of ``way`` of its classes from the meta-generator adapted to it in
   ``adaptation_steps`` steps (FIVE, dfml/methods/free/meta_generator.py), after the warm-up with the
   boundary-seeking term against the current meta-model (its logits without gradient, as the official code).
   After the warm-up, **every** teacher's batch goes to the memory (the official code stores only the last
   teacher's): per class the last ``query`` images as queries, the others as support. Then one first-order
   meta-update of the meta-generator, and, after the warm-up, one **BELL** update of the meta-model
   (dfml/methods/free/alignment.py): one Adam step per teacher on a copy, KD (KL on log-probabilities, T = 1; the
   official code passes probabilities) from that teacher on its own recovered batch, then
   ``reptile_scale`` * (theta - theta~) as the meta-model's gradient for one step of its Adam.
   During the warm-up only the meta-generator learns, synthesising without the student, and, as in the
   official code, its batches are not stored (``warmup_memory: true`` stores them).
2. **Replay** otherwise: ``meta_batch`` MAML tasks drawn from the whole memory (classes of different members in
   one task), one Adam step on their summed query loss (as BiDf-MKD).

Every random draw comes from the method's generator; the meta-generator and its persistent Adam are in the
checkpoint with everything dfml/methods/generative.py saves, so a resumed run continues exactly.

The package is FREE's alone: the method (here), the meta-generator (``meta_generator``) and BELL (``alignment``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from dfml.inversion.recovery import RecoveredBatch, RecoverySettings
from dfml.meta import MAML
from dfml.methods.base import EpisodeSettings, StepLog, check_finite
from dfml.methods.free.alignment import adam, aligned_update
from dfml.methods.free.meta_generator import AdversarialTerm, MetaGenerator
from dfml.methods.generative import GenerativeMethod, distillation_loss


@dataclass
class FreeSettings(EpisodeSettings):
    """The episodes and FREE's params.yaml entry (defaults: the paper's / the official code's, documented in the
    schema)."""

    teachers: int = 4
    per_class: int = 20
    adaptation_steps: int = 5
    generator_lr: float = 1e-3
    meta_generator_lr: float = 1e-3
    latent_dim: int = 256
    generator_width: int = 64
    adversarial: float = 1.0
    bn: float = 0.0
    warmup_events: int = 20
    warmup_memory: bool = False
    flip: bool = False
    bell_lr: float = 1e-3
    reptile_scale: float = 67.0
    memory_batches: int = 20
    generate_interval: int = 10

    def __post_init__(self) -> None:
        if self.teachers < 1:
            raise ValueError(f"a generation event needs at least one teacher, got teachers {self.teachers}")
        if self.per_class < self.shot + self.query:
            raise ValueError(f"a recovered batch has {self.per_class} images per class, split into support and "
                             f"query images, and replay tasks draw {self.shot} support (shot) and {self.query} "
                             f"query images per class without overlap: raise per_class to at least "
                             f"{self.shot + self.query}")

    def recovery(self) -> RecoverySettings:
        return RecoverySettings(steps=self.adaptation_steps, lr=self.generator_lr, latent_dim=self.latent_dim,
                                generator_width=self.generator_width, bn=self.bn, flip=self.flip)


@dataclass
class DistillationTask:
    """One teacher's recovered images and its logits on them (the recovered classes' columns)."""

    images: Tensor
    teacher_logits: Tensor


class FreeMethod(GenerativeMethod):
    """FREE (``algorithm: free``) behind the shared loop: white-box members, a meta-generator, a task memory."""

    algorithm = "free"
    access = "white_box"
    settings_class = FreeSettings
    curve_fields = ("generated", "warmup", "distillation_loss", "recovery_loss", "memory_classes")

    def __init__(self, pool: list, *args, **kwargs):
        super().__init__(pool, *args, **kwargs)
        if not isinstance(self.learner, MAML):
            raise ValueError("free replays its memory with MAML and aligns every parameter by BELL: "
                             f"use learner maml or fomaml, not {self.learner.name}")
        self.pool = pool
        self.meta_generator = MetaGenerator(self.channels, self.image_size, self.settings.recovery(),
                                            self.settings.meta_generator_lr, self.rng, self.device)

    @property
    def in_warmup(self) -> bool:
        return self.events < self.settings.warmup_events

    def step(self) -> StepLog:
        start = time.perf_counter()
        self.iteration += 1
        s = self.settings
        warmup = self.in_warmup
        generated = warmup or self.trigger.due or len(self.memory) < s.way
        values = {"generated": generated, "warmup": warmup, "distillation_loss": math.nan,
                  "recovery_loss": math.nan}
        if generated:
            loss, accuracy, values["recovery_loss"] = self.generation_event(warmup)
            values["distillation_loss"] = loss
        else:
            loss, accuracy = self.replay()
        self.trigger.observe(accuracy, generated)
        values["memory_classes"] = float(len(self.memory))
        return StepLog(self.iteration, loss, accuracy, time.perf_counter() - start, values)

    # -- generation events: FIVE, the memory, BELL -----------------------------------------------------

    def generation_event(self, warmup: bool) -> tuple[float, float, float]:
        """Recover a batch from each drawn teacher, meta-update the meta-generator and, after the warm-up, file
        the batches in the memory and align the meta-model; the meta-model's distillation loss and agreement
        with the teachers on their batches before its update, and the recoveries' mean loss."""
        s = self.settings
        student = None if warmup or s.adversarial == 0 else self.adversarial_term()
        tasks, gradients, recovery = [], [], []
        for index in torch.randint(len(self.pool), (s.teachers,), generator=self.rng).tolist():
            self.draws[index] += 1
            member = self.pool[index]
            chosen = torch.randperm(len(member.classes), generator=self.rng)[:s.way].tolist()
            mean, std = self.normalization[member.card["dataset"]]
            adaptation = self.meta_generator.adapt(member.model, chosen, s.per_class, mean=mean, std=std,
                                                   rng=self.rng, device=self.device, adversarial=student)
            if not warmup or s.warmup_memory:
                self.store(adaptation.batch, [member.qualified_classes[i] for i in chosen])
            with torch.no_grad():
                tasks.append(DistillationTask(adaptation.batch.images,
                                              member.model(adaptation.batch.images)[:, chosen]))
            gradients.append(adaptation.gradients)
            recovery.append(adaptation.batch.loss)
        self.meta_generator.meta_update(gradients)
        self.events += 1
        loss, accuracy = self.distillation_scores(tasks)
        check_finite(loss, self.iteration, "distillation loss")
        if not warmup:
            aligned_update(self._params, [self.distillation_loss_fn(task) for task in tasks], self.optimizer,
                           optimizer=adam(s.bell_lr), scale=s.reptile_scale)
        return loss, accuracy, sum(recovery) / len(recovery)

    def adversarial_term(self) -> AdversarialTerm:
        """The boundary-seeking term against the meta-model as it is now."""
        frozen = {name: p.detach() for name, p in self._params.items()}
        return AdversarialTerm(lambda x: functional_call(self.meta_model, frozen, (x,)), self.settings.adversarial)

    def store(self, batch: RecoveredBatch, names: list[str]) -> None:
        """Per class (the batch is ordered class by class) the last ``query`` images as queries, the rest as
        support: replay never draws one image as both."""
        s = self.settings
        position = torch.arange(len(batch.labels), device=batch.labels.device) % s.per_class
        support = position < s.per_class - s.query
        for split, rows in (("support", support), ("query", ~support)):
            self.memory.add_recovered(batch.images[rows.to(batch.images.device)], batch.labels[rows], names, split)

    def distillation_loss_fn(self, task: DistillationTask):
        n = task.teacher_logits.shape[1]
        return lambda weights: distillation_loss(
            functional_call(self.meta_model, weights, (task.images,))[:, :n], task.teacher_logits)

    @torch.no_grad()
    def distillation_scores(self, tasks: list[DistillationTask]) -> tuple[float, float]:
        """Mean KD loss and mean agreement (same top class) of the meta-model with each teacher on its batch."""
        losses, agreements = [], []
        for task in tasks:
            logits = functional_call(self.meta_model, self._params, (task.images,))[:, :task.teacher_logits.shape[1]]
            losses.append(float(distillation_loss(logits, task.teacher_logits)))
            agreements.append(float((logits.argmax(1) == task.teacher_logits.argmax(1)).float().mean()))
        return sum(losses) / len(losses), sum(agreements) / len(agreements)

    # -- replay ---------------------------------------------------------------------------------------

    def replay(self) -> tuple[float, float]:
        losses, accuracies = self.memory_task_losses(self.settings.meta_batch)
        total = torch.stack(losses).sum()
        self.meta_step(total)
        return float(total.detach()), sum(accuracies) / len(accuracies)

    # -- state: the shared one (dfml/methods/generative.py) and the meta-generator with its Adam --------

    def extra_state(self) -> dict:
        return {"meta_generator": self.meta_generator.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.meta_generator.load_state_dict(state["meta_generator"])

    def describe(self) -> str:
        s = self.settings
        return (f"free on {len(self.pool)} white-box members, {s.teachers} teachers per event, meta-generator "
                f"adapted {s.adaptation_steps} steps, {s.per_class} images per class, BELL scale {s.reptile_scale}, "
                f"{s.warmup_events} generator-only warm-up events")
