"""TACO (task-distributionally robust DFML, METHODS.md 4.2): recovered tasks, a task memory, task interpolation.

One meta-iteration:

* **Generation event** (the first iteration, then ``generate_interval`` iterations without a better
  meta-batch accuracy, or while the memory holds fewer than ``way`` classes): ``meta_batch`` members are drawn
  (uniformly; model-reliability weights come with dfml/methods/taco/reliability.py), and each recovers a support
  (``shot``) and a query (``query_per_class``) set of its classes through TACO's label-conditional generator
  (CE + BN statistics, dfml/inversion/recovery.py). Both go to the memory, and the iteration's update is the
  **first update on the new tasks**: the meta-learner adapts on each recovered support and its query logits
  are distilled to *that task's own member* (the official code uses the last sampled member for all four).
* **Replay**: ``meta_batch`` tasks from the whole memory, each with probability ``interpolation`` an
  interpolated task (two memory tasks mixed class by class in feature space, dfml/methods/taco/interpolation.py).

**Which members** (``selection``): ``uniform`` (TACO without ``--scheduleWeight``), or ``reliability``: learnt
model-reliability weights (dfml/methods/taco/reliability.py), updated by REINFORCE after each event with

* ``reward: metaval`` (as published): the updated meta-model's accuracy (%) on ``val_tasks`` real meta-val
  episodes: **not data-free**, the run's cards, members.json and the report say so;
* ``reward: pseudo`` (data-free, ours): per drawn member, how in-domain the members not drawn find its
  recovered images by their BN statistics, weighted by their own reliability (``agreement_rewards``).

**When** (``trigger``): ``metabatch`` (data-free: the meta-batch accuracy stops improving) or ``metaval`` (as
published: accuracy on ``val_tasks`` real meta-val episodes after every iteration; not data-free).

The package is TACO's alone: the method (here), task interpolation (``interpolation``) and the reliability
weights (``reliability``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dfml.evaluation.scoring import learner_scorer
from dfml.inversion.losses import bn_statistics_loss
from dfml.inversion.recovery import recover_from_model
from dfml.methods.base import StepLog, check_finite
from dfml.methods.generative import GenerativeMethod, GeneratorRecoverySettings, distillation_loss
from dfml.methods.taco.interpolation import check_mixable, interpolated_task_loss, sample_mixing_weight
from dfml.methods.taco.reliability import ReliabilityWeights, Selection, agreement_rewards

SELECTIONS = ("uniform", "reliability")
REWARDS = ("pseudo", "metaval")
TRIGGERS = ("metabatch", "metaval")


@dataclass
class TacoSettings(GeneratorRecoverySettings):
    """The episodes and TACO's params.yaml entry (defaults: the paper's, documented in the schema)."""

    query_per_class: int = 15
    memory_batches: int = 20
    interpolation: float = 0.5
    beta: float = 0.5
    generate_interval: int = 10
    selection: str = "uniform"
    reward: str = "pseudo"
    trigger: str = "metabatch"
    candidate_size: int | None = None
    reliability_lr: float = 0.1
    baseline: float | None = None
    val_tasks: int = 4

    @property
    def reads_metaval(self) -> bool:
        return self.trigger == "metaval" or (self.selection == "reliability" and self.reward == "metaval")

    @property
    def initial_baseline(self) -> float:
        """TACO's 40 (% meta-val accuracy) for ``metaval``; 50, the mean agreement reward, for ``pseudo``."""
        if self.baseline is not None:
            return self.baseline
        return 40.0 if self.reward == "metaval" else 50.0

    def __post_init__(self) -> None:
        for name, value, allowed in (("selection", self.selection, SELECTIONS), ("reward", self.reward, REWARDS),
                                     ("trigger", self.trigger, TRIGGERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 <= self.interpolation <= 1.0:
            raise ValueError(f"interpolation is a probability, got {self.interpolation}")
        if self.query_per_class < self.query:
            raise ValueError(f"replay tasks draw {self.query} query images per class from one recovered batch of "
                             f"{self.query_per_class}: raise query_per_class to at least {self.query}")


class TacoMethod(GenerativeMethod):
    """TACO (``algorithm: taco``) behind the shared loop: white-box members, a task memory, no pseudo data."""

    algorithm = "taco"
    access = "white_box"
    settings_class = TacoSettings
    # reward: the event's meta-val reward, or its lowest member reward (pseudo rewards always average 50)
    curve_fields = ("generated", "distillation_loss", "recovery_loss", "memory_classes", "interpolated", "reward")

    def __init__(self, pool: list, *args, **kwargs):
        super().__init__(pool, *args, **kwargs)
        s = self.settings
        if s.interpolation > 0:
            check_mixable(self.learner)
        if s.reads_metaval and not self.val_sets:
            raise ValueError(f"reward/trigger metaval reads real meta-val episodes: none were handed over")
        self.pool = pool
        self.weights = None
        if s.selection == "reliability":
            if len(pool) < s.meta_batch:
                raise ValueError(f"selection reliability draws {s.meta_batch} distinct members (meta_batch) per event: "
                                 f"the pool has {len(pool)}")
            if s.reward == "pseudo" and len(pool) <= s.meta_batch:
                raise ValueError(f"reward pseudo asks the members not drawn about the {s.meta_batch} drawn ones: the "
                                 f"pool needs more than {s.meta_batch} members, it has {len(pool)}")
            self.weights = ReliabilityWeights(len(pool), lr=s.reliability_lr, baseline=s.initial_baseline,
                                              candidate_size=s.candidate_size)

    @classmethod
    def reads_metaval(cls, method_settings: dict) -> bool:
        fields = {k: method_settings[k] for k in ("selection", "reward", "trigger") if k in method_settings}
        return TacoSettings(**fields).reads_metaval

    def step(self) -> StepLog:
        start = time.perf_counter()
        self.iteration += 1
        s = self.settings
        generated = self.trigger.due or len(self.memory) < s.way
        values = {"generated": generated, "distillation_loss": math.nan, "recovery_loss": math.nan,
                  "interpolated": 0.0, "reward": math.nan}
        if generated:
            losses, accuracies, recovery_loss, selection, rewards = self.generation_event()
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
        val_accuracy = self.metaval_accuracy() if s.trigger == "metaval" else None
        if generated and self.weights is not None:
            values["reward"] = self.reward_members(selection, rewards, val_accuracy)
        self.trigger.observe(val_accuracy if s.trigger == "metaval" else meta_accuracy, generated)
        values["memory_classes"] = float(len(self.memory))
        return StepLog(self.iteration, float(total.detach()), meta_accuracy, time.perf_counter() - start, values)

    def generation_event(self):
        """One recovered task per drawn member into the memory; the first update's distillation losses, the
        adapted meta-model's agreement with each member on its queries, the recoveries' mean loss, and with
        reliability weights the selection and its per-member ``pseudo`` rewards (None: the reward is meta-val's,
        measured after the update)."""
        s = self.settings
        losses, accuracies, recovery, images = [], [], [], []
        selection = self.draw_members()
        for index in selection.members:
            self.draws[index] += 1
            member = self.pool[index]
            chosen = torch.randperm(len(member.classes), generator=self.rng)[:s.way].tolist()
            support = self.recover(member, chosen, s.shot)
            query = self.recover(member, chosen, s.query_per_class)
            names = [member.qualified_classes[i] for i in chosen]
            self.memory.add_recovered(support.images, support.labels, names, "support")
            self.memory.add_recovered(query.images, query.labels, names, "query")
            recovery += [support.loss, query.loss]
            images.append(torch.cat([support.images, query.images]))
            with torch.no_grad():
                teacher = member.model(query.images)[:, chosen]
            adapted = self.learner.adapt(self.meta_model, self._params, support.images, support.labels,
                                         steps=self.learner.train_steps, create_graph=self.learner.second_order,
                                         n_way=len(chosen))
            logits = self.learner.query_logits(self.meta_model, self._params, adapted, query.images)[:, :len(chosen)]
            losses.append(distillation_loss(logits, teacher))
            accuracies.append(float((logits.detach().argmax(1) == teacher.argmax(1)).float().mean()))
        self.events += 1
        rewards = None
        if self.weights is not None and s.reward == "pseudo":
            rewards = self.pseudo_rewards(selection.members, images)
        return losses, accuracies, sum(recovery) / len(recovery), selection, rewards

    def reward_members(self, selection: Selection, rewards: list[float] | None, val_accuracy: float | None) -> float:
        """One REINFORCE step of the reliability weights after an event; the reward for the curve."""
        if self.settings.reward == "metaval":  # the updated meta-model on real meta-val episodes (TACO)
            rewards = 100 * (self.metaval_accuracy() if val_accuracy is None else val_accuracy)
        self.weights.update(selection, rewards)
        return min(rewards) if isinstance(rewards, list) else rewards

    def draw_members(self) -> Selection:
        """``meta_batch`` members: by the reliability weights (distinct), or uniformly with replacement (TACO)."""
        if self.weights is not None:
            return self.weights.sample(self.settings.meta_batch, self.rng)
        drawn = torch.randint(len(self.pool), (self.settings.meta_batch,), generator=self.rng).tolist()
        return Selection(members=drawn, candidates=list(range(len(self.pool))))

    @torch.no_grad()
    def pseudo_rewards(self, drawn: list[int], images: list[torch.Tensor]) -> list[float]:
        """:func:`agreement_rewards` of the drawn members' recovered images, judged by the other members."""
        references = [j for j in range(len(self.pool)) if j not in drawn]
        distances = torch.tensor([[float(bn_statistics_loss(self.pool[j].model, x)[1]) for x in images]
                                  for j in references])
        return agreement_rewards(distances, self.weights.probabilities()[references])

    def metaval_accuracy(self) -> float:
        """Mean accuracy of the meta-model now on ``val_tasks`` real meta-val episodes drawn at random (TACO's
        reward and trigger; not data-free)."""
        sizes = [len(es) for es in self.val_sets]
        picks = torch.randint(sum(sizes), (self.settings.val_tasks,), generator=self.rng).tolist()
        scorer = learner_scorer(self.learner, self.meta_model, self._params)
        total = 0.0
        for pick in picks:
            for es, size in zip(self.val_sets, sizes):
                if pick < size:
                    total += scorer(es.sampler.materialize(es.specs[pick], self.device))
                    break
                pick -= size
        return total / len(picks)

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

    # -- the reliability weights' state, and what the run reports about its members ----------------

    def extra_state(self) -> dict:
        return {} if self.weights is None else {"reliability": self.weights.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.weights is not None:
            self.weights.load_state_dict(state["reliability"])

    def member_usage(self) -> dict:
        if self.weights is None:
            return super().member_usage()
        return {"selection": "reliability", "reward": self.settings.reward,
                "probabilities": self.weights.probabilities().tolist(), "logits": self.weights.logits.tolist()}

    def card_fields(self) -> dict:
        s = self.settings
        return {**super().card_fields(), "data_free": not s.reads_metaval, "selection": s.selection,
                "reward": s.reward if self.weights is not None else None, "trigger": s.trigger}

    def describe(self) -> str:
        s = self.settings
        chosen = f"reliability weights ({s.reward} reward)" if self.weights is not None else "uniform members"
        note = "; reads real meta-val episodes: not data-free" if s.reads_metaval else ""
        return (f"taco on {len(self.pool)} white-box members, {chosen}, trigger {s.trigger}, {s.recovery_steps} "
                f"recovery steps, interpolation {s.interpolation}, learner {self.learner.name}{note}")
