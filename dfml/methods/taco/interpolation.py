"""Task interpolation (TACO, METHODS.md 4.2): two memory tasks mixed class by class in feature space.

Class k of the first task is mixed with class k of the second, row by row (``TaskMemory.sample_task`` orders
support and query class by class, so equal-shaped tasks line up), as lambda * f(second) + (1 - lambda) *
f(first) with lambda ~ Beta(0.5, 0.5); the first task's labels are kept. Each of the four image sets goes
through the backbone on its own, as in a plain task (batch-statistics BN sees the same batches), so
lambda = 0 gives exactly the first task's loss. Only learners that adapt on features can take a mixed task
(ProtoNet, ANIL); MAML adapts every layer on images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfml.meta.learners import Learner, backbone_features
from dfml.meta.params import ParamDict
from dfml.meta.tasks import Task


def check_mixable(learner: Learner) -> None:
    if not hasattr(learner, "logits_on_features"):
        raise ValueError(f"task interpolation mixes backbone features: learner {learner.name!r} adapts every layer "
                         "on images; use protonet or anil, or set the interpolation probability to 0")


def sample_mixing_weight(rng: torch.Generator, alpha: float = 0.5) -> float:
    """lambda ~ Beta(alpha, alpha), drawn through a seed taken from ``rng`` (torch has no seeded Beta sampler),
    so a run resumed with the same ``rng`` state draws the same lambda."""
    if not alpha > 0:
        raise ValueError(f"the Beta parameter must be > 0, got {alpha}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(first: Tensor, second: Tensor, weight: float) -> Tensor:
    return weight * second + (1.0 - weight) * first


def interpolated_task_loss(learner: Learner, model: nn.Module, params: ParamDict, first: Task, second: Task,
                           weight: float, *, training: bool = True) -> tuple[Tensor, Tensor]:
    """Query cross-entropy (the first task's labels) and accuracy of the mixed task."""
    check_mixable(learner)
    for name in ("support_x", "query_x"):
        if getattr(first, name).shape != getattr(second, name).shape:
            raise ValueError(f"tasks mixed class by class need equal shapes, {name}: "
                             f"{tuple(getattr(first, name).shape)} vs {tuple(getattr(second, name).shape)}")

    def features(task: Task, name: str) -> Tensor:
        return backbone_features(model, params, getattr(task, name))

    support = mix(features(first, "support_x"), features(second, "support_x"), weight)
    query = mix(features(first, "query_x"), features(second, "query_x"), weight)
    steps = learner.default_steps(training)
    logits = learner.logits_on_features(model, params, support, first.support_y, query, steps=steps,
                                        create_graph=training and learner.second_order, n_way=first.n_way)
    loss = F.cross_entropy(logits, first.query_y)
    accuracy = (logits.detach().argmax(dim=-1) == first.query_y).to(logits.dtype).mean()
    return loss, accuracy
