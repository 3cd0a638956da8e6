"""BiDf-MKD (ICML 2023): data-free meta-learning from black-box APIs (METHODS.md 4.1).

The pool is only reachable through query functions (dfml/models/access.py). One meta-iteration:

1. **Generation event** (the first iteration, then whenever the meta-batch accuracy has not improved for
   ``generate_interval`` iterations): pick an API, recover a support and a query set of its classes
   through the zero-order estimator (dfml/inversion/recovery.py), with the boundary term on the queries
   after ``boundary_start`` (the L1 between the API's and the meta-model's logits summed over classes, the
   meta-model's logits held fixed, as the official code; ``boundary_through_student`` adds their exact
   gradient); store both in the task memory (dfml/meta/memory.py); and add one **bi-level
   meta knowledge distillation** episode to the meta-batch: ``kd_steps`` SGD steps of KD(API -> meta-model)
   on the recovered support (inner), then KD on the recovered queries through the adapted weights (outer).
   KD is KL(p_API || p_model) on log-probabilities (the official code passes probabilities: METHODS 6.2.3).
2. **Replay**: the rest of the meta-batch are tasks drawn from the whole memory (classes of different APIs
   in one task), scored by the meta-learner (MAML) as usual.
3. One Adam step on the summed meta-batch loss.

Every random draw comes from one generator in the method's state, and the memory, the trigger and the API
query counts are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from dfml.inversion.recovery import BoundaryTerm, RecoveredBatch, RecoverySettings, recover_from_api
from dfml.meta import MAML
from dfml.methods.base import EpisodeSettings, StepLog
from dfml.methods.generative import GenerativeMethod, distillation_loss
from dfml.models.access import BlackBoxAPI, total_queries, total_seconds


@dataclass
class BidfmkdSettings(EpisodeSettings):
    """The method's settings: the episodes and its params.yaml entry (defaults: the paper's, documented in
    the schema)."""

    q: int = 100
    mu: float = 0.005
    query_batch: int = 4096
    recovery_steps: int = 200
    generator_lr: float = 1e-3
    latent_dim: int = 256
    generator_width: int = 64
    support_per_class: int = 30
    query_per_class: int = 30
    memory_batches: int = 20
    kd_steps: int = 10
    kd_lr: float = 0.01
    boundary_start: int = 4000
    boundary_weight: float = 1.0
    boundary_through_student: bool = False
    generate_interval: int = 200
    flip: bool = False

    def __post_init__(self) -> None:
        for per_class, needed, what in ((self.support_per_class, self.shot, "support images per task class (shot)"),
                                        (self.query_per_class, self.query, "query images per task class (query)")):
            if per_class < needed:
                raise ValueError(f"a recovered batch has {per_class} images per class but replay tasks draw {needed} "
                                 f"{what} from one class: raise support_per_class / query_per_class to at least "
                                 f"{needed}")

    def recovery(self) -> RecoverySettings:
        return RecoverySettings(steps=self.recovery_steps, lr=self.generator_lr, latent_dim=self.latent_dim,
                                generator_width=self.generator_width, q=self.q, mu=self.mu,
                                query_batch=self.query_batch, flip=self.flip)


class BidfmkdMethod(GenerativeMethod):
    """BiDf-MKD (``algorithm: bidfmkd``) behind the shared loop: black-box APIs, a task memory, no pseudo data."""

    algorithm = "bidfmkd"
    access = "black_box"
    settings_class = BidfmkdSettings
    curve_fields = ("generated", "kd_loss", "recovery_loss", "memory_classes", "api_queries", "api_seconds")

    def __init__(self, apis: list[BlackBoxAPI], *args, **kwargs):
        super().__init__(apis, *args, **kwargs)
        if not isinstance(self.learner, MAML):
            raise ValueError("bidfmkd adapts every parameter by distillation (MAML's inner loop): "
                             f"use learner maml or fomaml, not {self.learner.name}")
        self.apis = apis

    # -- one meta-iteration ---------------------------------------------------------------------

    def step(self) -> StepLog:
        start = time.perf_counter()
        self.iteration += 1
        s = self.settings
        generated = self.trigger.due or len(self.memory) < s.way
        losses, accuracies, kd_loss, recovery_loss = [], [], math.nan, math.nan
        if generated:
            kd, accuracy, recovery_loss = self.generation_event()
            losses.append(kd)
            accuracies.append(accuracy)
            kd_loss = float(kd.detach())
        if len(self.memory) >= s.way:
            replayed, replay_accuracies = self.memory_task_losses(s.meta_batch - len(losses))
            losses += replayed
            accuracies += replay_accuracies
        total = torch.stack(losses).sum()
        self.meta_step(total)
        meta_accuracy = sum(accuracies) / len(accuracies)
        self.trigger.observe(meta_accuracy, generated)
        return StepLog(self.iteration, float(total.detach()), meta_accuracy, time.perf_counter() - start,
                       {"generated": generated, "kd_loss": kd_loss, "recovery_loss": recovery_loss,
                        "memory_classes": float(len(self.memory)), "api_queries": float(total_queries(self.apis)),
                        "api_seconds": total_seconds(self.apis)})

    def generation_event(self) -> tuple[torch.Tensor, float, float]:
        """Recover a task from one API into the memory; the bi-level KD episode's loss and accuracy (the adapted
        meta-model's agreement with the API on the recovered queries), and the recovery losses' mean."""
        s = self.settings
        drawn = int(torch.randint(len(self.apis), (1,), generator=self.rng))
        self.draws[drawn] += 1
        api = self.apis[drawn]
        chosen = torch.randperm(len(api.classes), generator=self.rng)[:s.way].tolist()
        support = self.recover(api, chosen, s.support_per_class, boundary=False)
        query = self.recover(api, chosen, s.query_per_class, boundary=self.iteration > s.boundary_start)
        names = [api.classes[i] for i in chosen]
        self.memory.add_recovered(support.images, support.labels, names, "support")
        self.memory.add_recovered(query.images, query.labels, names, "query")
        self.events += 1
        loss, accuracy = self.bilevel_distillation(api, chosen, support, query)
        return loss, accuracy, (support.loss + query.loss) / 2

    def recover(self, api: BlackBoxAPI, chosen: list[int], per_class: int, boundary: bool) -> RecoveredBatch:
        mean, std = self.normalization[api.dataset]
        term = None
        if boundary and self.settings.boundary_weight > 0:
            frozen = {name: p.detach() for name, p in self._params.items()}
            term = BoundaryTerm(lambda x: functional_call(self.meta_model, frozen, (x,)), self.settings.boundary_weight,
                                through_student=self.settings.boundary_through_student)
        return recover_from_api(api, chosen, per_class, channels=self.channels, image_size=self.image_size,
                                mean=mean, std=std, settings=self.settings.recovery(), rng=self.rng,
                                device=self.device, boundary=term)

    def bilevel_distillation(self, api: BlackBoxAPI, chosen: list[int], support: RecoveredBatch,
                             query: RecoveredBatch) -> tuple[torch.Tensor, float]:
        n = len(chosen)
        teacher_support = api(support.images)[:, chosen]
        teacher_query = api(query.images)[:, chosen]

        def inner_loss(weights):
            return distillation_loss(functional_call(self.meta_model, weights, (support.images,))[:, :n],
                                     teacher_support)

        adapted = self.learner.minimise(inner_loss, self._params, self.settings.kd_steps,
                                        create_graph=self.learner.second_order, lr=self.settings.kd_lr)
        logits = functional_call(self.meta_model, adapted, (query.images,))[:, :n]
        agreement = (logits.detach().argmax(1) == teacher_query.argmax(1)).float().mean()
        return distillation_loss(logits, teacher_query), float(agreement)

    # -- state: the shared one (dfml/methods/generative.py) and the API budget ----------------------

    def extra_state(self) -> dict:
        return {"api_queries": [api.queries for api in self.apis], "api_seconds": [api.seconds for api in self.apis]}

    def load_extra_state(self, state: dict) -> None:
        for api, queries, seconds in zip(self.apis, state["api_queries"], state["api_seconds"]):
            api.queries, api.seconds = int(queries), float(seconds)

    def describe(self) -> str:
        s = self.settings
        return (f"bidfmkd on {len(self.apis)} black-box APIs, q {s.q}, {s.recovery_steps} recovery steps, "
                f"{s.support_per_class}+{s.query_per_class} images per class")

    def card_fields(self) -> dict:
        return {"api_queries": total_queries(self.apis), "api_seconds": round(total_seconds(self.apis), 1),
                **super().card_fields()}
