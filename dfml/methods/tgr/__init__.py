"""TGR (Task Groupings Regularization, ICML 2024; METHODS.md 4.4): heterogeneous groups of members, a
regulariser on the variance of their gradients, a task memory replayed with MAML.

**Grouping** (once, at the first iteration; its cost is the curve's ``grouping_seconds``): each member recovers
``embedding_batches`` batches of its own classes (fresh generator, CE + BN statistics: the shared
``recover_from_model``); its embedding is the diagonal Fisher of a probe network on them (dfml/methods/tgr/fisher.py;
``probe``: the meta-model's initialisation, or a seeded random network, never a download); the members are
split into ``groups`` groups by their dissimilarity (dfml/methods/tgr/grouping.py; ``grouping``: TGR's spectral
``dissimilar``, our balanced ``heterogeneous``, or ``similar`` / ``random`` for the study). The groups and the
dissimilarities are part of the checkpoint.

One meta-iteration:

* **Generation event** (the first iteration, then ``generate_interval`` iterations without a better meta-batch
  accuracy): one group (seeded, uniform), ``teachers`` members drawn from it with replacement; each recovers
  ``support_per_class`` + ``query_per_class`` images of ``way`` of its classes, filed in the memory as support
  and query; one Adam step along the **regularised gradient** (dfml/methods/tgr/regularizer.py) of the teachers'
  losses L_i = KD(member -> meta-model) + ``ce`` * CE(meta-model, recovered labels) on their images.
* **Replay**: ``meta_batch`` tasks from the whole memory, scored by MAML, one Adam step on their mean loss.

The package is TGR's alone: the method (here), its Fisher embedding (``fisher``), groupings (``grouping``) and
gradient regulariser (``regularizer``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dfml.data.store import atomic_write_text
from dfml.inversion.recovery import RecoveredBatch, recover_from_model
from dfml.methods.base import StepLog, check_finite
from dfml.methods.generative import GenerativeMethod, GeneratorRecoverySettings, distillation_loss
from dfml.methods.tgr.fisher import PROBES, dissimilarity_matrix, make_probe, task_embedding
from dfml.methods.tgr.grouping import GROUPINGS, group_members
from dfml.methods.tgr.regularizer import regularised_gradient


@dataclass
class TgrSettings(GeneratorRecoverySettings):
    """The episodes and TGR's params.yaml entry (defaults: the paper's, documented in the schema)."""

    support_per_class: int = 15
    query_per_class: int = 15
    teachers: int = 4
    ce: float = 1.0
    regularizer: bool = True
    displace_lr: float = 1e-3
    through_displacement: bool = True
    groups: int = 5
    grouping: str = "dissimilar"
    probe: str = "init"
    embedding_batches: int = 20
    embedding_per_class: int = 30
    memory_batches: int = 20
    generate_interval: int = 4

    def __post_init__(self) -> None:
        for name, value, allowed in (("grouping", self.grouping, GROUPINGS), ("probe", self.probe, PROBES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for per_class, needed, what in ((self.support_per_class, self.shot, "support images (shot)"),
                                        (self.query_per_class, self.query, "query images (query)")):
            if per_class < needed:
                raise ValueError(f"replay tasks draw {needed} {what} per class from one recovered batch of "
                                 f"{per_class}: raise support_per_class / query_per_class to at least {needed}")

    @property
    def per_class(self) -> int:
        return self.support_per_class + self.query_per_class


class TgrMethod(GenerativeMethod):
    """TGR (``algorithm: tgr``) behind the shared loop: white-box members, groups, a task memory, MAML."""

    algorithm = "tgr"
    access = "white_box"
    settings_class = TgrSettings
    curve_fields = ("generated", "group", "teacher_loss", "gradient_variance", "recovery_loss", "memory_classes",
                    "grouping_seconds")

    def __init__(self, pool: list, *args, **kwargs):
        super().__init__(pool, *args, **kwargs)
        if self.learner.name != "maml":
            raise ValueError(f"tgr replays its memory with MAML: use learner maml or fomaml, not "
                             f"{self.learner.name}")
        s = self.settings
        if s.groups > len(pool):
            raise ValueError(f"groups {s.groups} exceeds the pool's {len(pool)} members: lower groups")
        self.pool = pool
        self.probe = make_probe(s.probe, self.meta_model, seed=int(torch.randint(2**31, (1,), generator=self.rng)))
        self.groups: list[list[int]] | None = None
        self.dissimilarity: torch.Tensor | None = None
        self.grouping_seconds = math.nan

    # -- one meta-iteration ---------------------------------------------------------------------

    def step(self) -> StepLog:
        start = time.perf_counter()
        self.iteration += 1
        s = self.settings
        values = {"generated": False, "group": math.nan, "teacher_loss": math.nan, "gradient_variance": math.nan,
                  "recovery_loss": math.nan, "grouping_seconds": math.nan}
        if self.groups is None:
            self.form_groups()
            values["grouping_seconds"] = self.grouping_seconds
        generated = self.trigger.due or len(self.memory) < s.way
        self.optimizer.zero_grad(set_to_none=True)
        if generated:
            loss, accuracy, event = self.generation_event()
            values.update(event, generated=True, teacher_loss=float(loss))
        else:
            loss, accuracy = self.replay()
        check_finite(loss, self.iteration, "teacher loss" if generated else "meta-batch loss")
        self.optimizer.step()
        self.trigger.observe(accuracy, generated)
        values["memory_classes"] = float(len(self.memory))
        return StepLog(self.iteration, float(loss), accuracy, time.perf_counter() - start, values)

    def generation_event(self) -> tuple[torch.Tensor, float, dict]:
        """Teachers from one group recover tasks into the memory; the regularised gradient of their losses is set
        on the meta-model. Its teachers' mean loss and agreement with the recovered labels, and curve values."""
        s = self.settings
        nonempty = [g for g in self.groups if g]
        group = int(torch.randint(len(nonempty), (1,), generator=self.rng))
        members = nonempty[group]
        drawn = [members[i] for i in torch.randint(len(members), (s.teachers,), generator=self.rng).tolist()]
        losses, images, agreements, recovery = [], [], [], []
        for index in drawn:
            self.draws[index] += 1
            member = self.pool[index]
            chosen = torch.randperm(len(member.classes), generator=self.rng)[:s.way].tolist()
            batch = self.recover(member, chosen, s.per_class)
            self.file_in_memory(batch, [member.qualified_classes[i] for i in chosen])
            recovery.append(batch.loss)
            losses.append(self.teacher_loss(member, chosen, batch))
            agreements.append(self.agreement(batch, len(chosen)))
        self.events += 1
        result = regularised_gradient(losses, self._params, s.displace_lr, regularise=s.regularizer,
                                      through_displacement=s.through_displacement)
        check_finite(torch.stack([d.sum() for d in result.direction.values()]).sum(), self.iteration,
                     "regularised gradient")
        for name, parameter in self._params.items():
            parameter.grad = result.direction[name]
        event = {"group": float(self.groups.index(members)), "gradient_variance": result.gradient_variance,
                 "recovery_loss": sum(recovery) / len(recovery)}
        return result.loss, sum(agreements) / len(agreements), event

    def teacher_loss(self, member, chosen: list[int], batch: RecoveredBatch):
        """L_i(weights) = KD(member -> meta-model) + ce * CE(meta-model, recovered labels) on the member's images."""
        with torch.no_grad():
            teacher = member.model(batch.images)[:, chosen]
        ce, n = self.settings.ce, len(chosen)

        def loss(weights):
            logits = functional_call(self.meta_model, weights, (batch.images,))[:, :n]
            return distillation_loss(logits, teacher) + ce * F.cross_entropy(logits, batch.labels)

        return loss

    @torch.no_grad()
    def agreement(self, batch: RecoveredBatch, n: int) -> float:
        logits = functional_call(self.meta_model, self._params, (batch.images,))[:, :n]
        return float((logits.argmax(1) == batch.labels).float().mean())

    def file_in_memory(self, batch: RecoveredBatch, names: list[str]) -> None:
        """The first ``support_per_class`` images of each class as support, the rest as query."""
        per_class = self.settings.per_class
        position = torch.arange(len(batch.labels), device=batch.labels.device) - batch.labels * per_class
        support = position < self.settings.support_per_class
        self.memory.add_recovered(batch.images[support], batch.labels[support], names, "support")
        self.memory.add_recovered(batch.images[~support], batch.labels[~support], names, "query")

    def replay(self) -> tuple[torch.Tensor, float]:
        losses, accuracies = self.memory_task_losses(self.settings.meta_batch)
        total = torch.stack(losses).mean()
        check_finite(total, self.iteration, "meta-batch loss")
        total.backward()
        return total.detach(), sum(accuracies) / len(accuracies)

    def recover(self, member, chosen: list[int], per_class: int) -> RecoveredBatch:
        mean, std = self.normalization[member.card["dataset"]]
        return recover_from_model(member.model, chosen, per_class, channels=self.channels,
                                  image_size=self.image_size, mean=mean, std=std, settings=self.settings.recovery(),
                                  rng=self.rng, device=self.device)

    # -- the groups: formed once, kept in the checkpoint ----------------------------------------------

    def form_groups(self) -> None:
        """Embed every member (recovered images, probe Fisher) and split the pool by their dissimilarity."""
        start = time.perf_counter()
        s = self.settings
        embeddings = [self.embed(member) for member in self.pool]
        self.dissimilarity = dissimilarity_matrix(embeddings)
        seed = int(torch.randint(2**31, (1,), generator=self.rng))
        self.groups = group_members(1.0 - self.dissimilarity, s.groups, s.grouping, seed)
        self.grouping_seconds = time.perf_counter() - start

    def embed(self, member) -> dict[str, torch.Tensor]:
        classes = list(range(len(member.classes)))
        batches = [self.recover(member, classes, self.settings.embedding_per_class)
                   for _ in range(self.settings.embedding_batches)]
        images = torch.cat([b.images for b in batches])
        labels = torch.cat([b.labels for b in batches])
        return task_embedding(self.probe, images, labels, len(classes))

    def extra_state(self) -> dict:
        if self.groups is None:
            return {"group_of": torch.zeros(0, dtype=torch.long)}
        group_of = torch.empty(len(self.pool), dtype=torch.long)
        for g, members in enumerate(self.groups):
            group_of[members] = g
        return {"group_of": group_of, "dissimilarity": self.dissimilarity, "grouping_seconds": self.grouping_seconds}

    def load_extra_state(self, state: dict) -> None:
        group_of = state["group_of"]
        if group_of.numel() == 0:
            return
        self.groups = [torch.nonzero(group_of == g).flatten().tolist() for g in range(self.settings.groups)]
        self.dissimilarity = state["dissimilarity"]
        self.grouping_seconds = float(state["grouping_seconds"])

    # -- what the run reports -------------------------------------------------------------------

    def write_outputs(self, out: Path) -> None:
        """``members.json`` (the base format) with each member's ``group`` and the groups' settings added."""
        super().write_outputs(out)
        path = Path(out) / "members.json"
        record = json.loads(path.read_text())
        group_of = {m: g for g, members in enumerate(self.groups or []) for m in members}
        for entry in record["members"]:
            entry["group"] = group_of.get(entry["index"])
        record["groups"] = {"grouping": self.settings.grouping, "probe": self.settings.probe,
                            "members": self.groups,
                            "dissimilarity": None if self.dissimilarity is None else
                            [[round(float(v), 6) for v in row] for row in self.dissimilarity]}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    def card_fields(self) -> dict:
        s = self.settings
        return {**super().card_fields(), "grouping": s.grouping, "probe": s.probe, "groups": self.groups,
                "regularizer": s.regularizer,
                "grouping_seconds": None if math.isnan(self.grouping_seconds) else round(self.grouping_seconds, 3)}

    def describe(self) -> str:
        s = self.settings
        regulariser = (f"gradient regulariser (displace_lr {s.displace_lr})" if s.regularizer
                       else "no regulariser")
        return (f"tgr on {len(self.pool)} white-box members in {s.groups} {s.grouping} groups (probe {s.probe}), "
                f"{s.teachers} teachers per event, {regulariser}, {s.recovery_steps} recovery steps, "
                f"learner {self.learner.name}")
