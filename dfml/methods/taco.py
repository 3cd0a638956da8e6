"""TACO (task-distributionally robust DFML, METHODS.md 4.2): recovered tasks, a task memory, task interpolation.

One meta-iteration:

* **Generation event** (the first iteration, then ``generate_interval`` iterations without a better
  meta-batch accuracy, or while the memory holds fewer than ``way`` classes): ``meta_batch`` members are drawn
  (uniformly; model-reliability weights come with dfml/methods/reliability.py), and each recovers a support
  (``shot``) and a query (``query_per_class``) set of its classes through TACO's label-conditional generator
  (CE + BN statistics, dfml/inversion/recovery.py). Both go to the memory, and the iteration's update is the
  **first update on the new tasks**: the meta-learner adapts on each recovered support and its query logits
  are distilled to *that task's own member* (the official code uses the last sampled member for all four).
* **Replay**: ``meta_batch`` tasks from the whole memory, each with probability ``interpolation`` an
  interpolated task (two memory tasks mixed class by class in feature space, dfml/meta/interpolation.py).

The trigger here watches the meta-batch accuracy (data-free); the published trigger and reward use real
meta-val episodes, which this method does not read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dfml.inversion.recovery import RecoverySettings, recover_from_model
from dfml.meta.interpolation import check_mixable, interpolated_task_loss, sample_mixing_weight
from dfml.methods.base import EpisodeSettings, StepLog, check_finite
from dfml.methods.generative import GenerativeMethod, distillation_loss


@dataclass
class TacoSettings(EpisodeSettings):
    """The episodes and TACO's params.yaml entry (defaults: the paper's, documented in the schema)."""

    recovery_steps: int = 200
    generator_lr: float = 1e-3
    latent_dim: int = 256
    generator_width: int = 64
    bn: float = 1.0
    query_per_class: int = 15
    memory_batches: int = 20
    interpolation: float = 0.5
    beta: float = 0.5
    generate_interval: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.interpolation <= 1.0:
            raise ValueError(f"interpolation is a probability, got {self.interpolation}")
        if self.query_per_class < self.query:
            raise ValueError(f"replay tasks draw {self.query} query images per class from one recovered batch of "
                             f"{self.query_per_class}: raise query_per_class to at least {self.query}")

    def recovery(self) -> RecoverySettings:
        return RecoverySettings(steps=self.recovery_steps, lr=self.generator_lr, latent_dim=self.latent_dim,
                                generator_width=self.generator_width, bn=self.bn)


class TacoMethod(GenerativeMethod):
    """TACO (``algorithm: taco``) behind the shared loop: white-box members, a task memory, no pseudo data."""

    algorithm = "taco"
    access = "white_box"
    settings_class = TacoSettings
    curve_fields = ("generated", "distillation_loss", "recovery_loss", "memory_classes", "interpolated")

    def __init__(self, pool: list, *args, **kwargs):
        super().__init__(pool, *args, **kwargs)
        if self.settings.interpolation > 0:
            check_mixable(self.learner)
        self.pool = pool

    def step(self) -> StepLog:
        start = time.perf_counter()
        self.iteration += 1
        s = self.settings
        generated = self.trigger.due or len(self.memory) < s.way
        values = {"generated": generated, "distillation_loss": math.nan, "recovery_loss": math.nan,
                  "interpolated": 0.0}
        if generated:
            losses, accuracies, recovery_loss = self.generation_event()
            values["recovery_loss"] = recovery_loss
        else:
            losses, accuracies, values["interpolated"] = self.replay()
        total = torch.stack(losses).mean()
        check_finite(total, self.iteration, "meta-batch loss")
        if generated:
            values["distillation_loss"] = float(total.detach())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        meta_accuracy = sum(accuracies) / len(accuracies)
        self.trigger.observe(meta_accuracy, generated)
        values["memory_classes"] = float(len(self.memory))
        return StepLog(self.iteration, float(total.detach()), meta_accuracy, time.perf_counter() - start, values)

    def generation_event(self) -> tuple[list[torch.Tensor], list[float], float]:
        """One recovered task per drawn member into the memory; the first update's distillation losses, the
        adapted meta-model's agreement with each member on its queries, and the recoveries' mean loss."""
        s = self.settings
        losses, accuracies, recovery = [], [], []
        for index in torch.randint(len(self.pool), (s.meta_batch,), generator=self.rng).tolist():
            member = self.pool[index]
            chosen = torch.randperm(len(member.classes), generator=self.rng)[:s.way].tolist()
            support = self.recover(member, chosen, s.shot)
            query = self.recover(member, chosen, s.query_per_class)
            names = [member.qualified_classes[i] for i in chosen]
            self.memory.add_recovered(support.images, support.labels, names, "support")
            self.memory.add_recovered(query.images, query.labels, names, "query")
            recovery += [support.loss, query.loss]
            with torch.no_grad():
                teacher = member.model(query.images)[:, chosen]
            adapted = self.learner.adapt(self.meta_model, self._params, support.images, support.labels,
                                         steps=self.learner.train_steps, create_graph=self.learner.second_order,
                                         n_way=len(chosen))
            logits = self.learner.query_logits(self.meta_model, self._params, adapted, query.images)[:, :len(chosen)]
            losses.append(distillation_loss(logits, teacher))
            accuracies.append(float((logits.detach().argmax(1) == teacher.argmax(1)).float().mean()))
        self.events += 1
        return losses, accuracies, sum(recovery) / len(recovery)

    def recover(self, member, chosen: list[int], per_class: int):
        mean, std = self.normalization[member.card["dataset"]]
        return recover_from_model(member.model, chosen, per_class, channels=self.channels,
                                  image_size=self.image_size, mean=mean, std=std, settings=self.settings.recovery(),
                                  rng=self.rng, device=self.device)

    def replay(self) -> tuple[list[torch.Tensor], list[float], float]:
        s = self.settings
        losses, accuracies, mixed = [], [], 0
        for _ in range(s.meta_batch):
            first, _ = self.memory.sample_task(s.way, s.shot, s.query, self.rng, self.device)
            if float(torch.rand((), generator=self.rng)) < s.interpolation:
                second, _ = self.memory.sample_task(s.way, s.shot, s.query, self.rng, self.device)
                weight = sample_mixing_weight(self.rng, s.beta)
                loss, accuracy = interpolated_task_loss(self.learner, self.meta_model, self._params, first, second,
                                                        weight)
                mixed += 1
            else:
                loss, accuracy = self.learner.task_loss(self.meta_model, self._params, first, training=True)
            losses.append(loss)
            accuracies.append(float(accuracy))
        return losses, accuracies, mixed / s.meta_batch

    def describe(self) -> str:
        s = self.settings
        return (f"taco on {len(self.pool)} white-box members, {s.recovery_steps} recovery steps, interpolation "
                f"{s.interpolation}, learner {self.learner.name}")
