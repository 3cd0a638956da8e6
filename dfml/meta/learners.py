"""MAML, first-order MAML, ANIL and ProtoNet, written once and functionally.

Every learner works on an explicit parameter dict (``torch.func.functional_call``), never on the
module's own weights, and never edits a tensor in place. The same code serves

* meta-training (``training=True``): the graph runs through the inner loop, second order unless
  ``first_order``; in second-order mode the adapted weights also stay differentiable w.r.t. the
  support and query images, which PURER's ECI adversarial step back-propagates into;
* evaluation (``training=False``): inner-loop gradients without a second-order graph and the
  query pass under ``no_grad``;
* the loop over tasks and the ``torch.func.vmap`` path of :func:`dfml.meta.batched.meta_batch_loss`.

The model must have a ``backbone`` (images -> ``[B, feature_dim]``) and a linear ``head``, so
parameter names start with ``backbone.`` / ``head.`` (``dfml.models.FewShotNet``).
"""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dfml.meta.params import (
    BACKBONE_PREFIX,
    HEAD_PREFIX,
    ParamDict,
    loss_and_gradients,
    require_submodule,
    select_prefix,
    strip_prefix,
)
from dfml.meta.tasks import Task, check_task_shapes

_USE_FUNCTORCH_GRAD = contextvars.ContextVar("dfml_meta_use_functorch_grad", default=False)


@contextmanager
def functorch_inner_gradients() -> Iterator[None]:
    """Take inner-loop gradients with ``torch.func.grad`` instead of ``torch.autograd.grad``.

    Needed inside ``torch.func.vmap``: there the per-task tensors are wrapped, and
    ``torch.autograd.grad`` sees a loss that does not require grad.
    """
    token = _USE_FUNCTORCH_GRAD.set(True)
    try:
        yield
    finally:
        _USE_FUNCTORCH_GRAD.reset(token)


def inner_gradients(loss_fn: Callable[[ParamDict], Tensor], weights: ParamDict, *, create_graph: bool) -> ParamDict:
    """d loss_fn(weights) / d weights; differentiable (second order) only when ``create_graph``."""
    if _USE_FUNCTORCH_GRAD.get():
        grads = torch.func.grad(loss_fn)(weights)
    else:
        _, grads = loss_and_gradients(loss_fn, weights, create_graph=create_graph)
    if not create_graph:
        grads = {name: grad.detach() for name, grad in grads.items()}
    return grads


class Learner(ABC):
    """Common interface: ``adapt`` on the support, ``query_logits`` with what ``adapt`` returned."""

    name: str = "learner"
    second_order: bool = False
    train_steps: int = 0
    test_steps: int = 0

    @abstractmethod
    def adapt(self, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor, *,
              steps: int, create_graph: bool, n_way: int | None = None) -> Any:
        """Task-specific state from the support set (adapted params, or prototypes)."""

    @abstractmethod
    def query_logits(self, model: nn.Module, params: ParamDict, adapted: Any, query_x: Tensor) -> Tensor:
        """``[n_query, n_way]`` logits for the query images."""

    def task_loss(self, model: nn.Module, params: ParamDict, task: Task, *, steps: int | None = None,
                  training: bool) -> tuple[Tensor, Tensor]:
        """Query cross-entropy after adapting on the support, and query accuracy (detached).

        ``steps`` defaults to ``train_steps`` / ``test_steps`` according to ``training``.
        """
        return self.loss_on_tensors(model, params, task.support_x, task.support_y, task.query_x, task.query_y,
                                    n_way=task.n_way, steps=steps, training=training)

    def loss_on_tensors(self, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor,
                        query_x: Tensor, query_y: Tensor, *, n_way: int | None = None, steps: int | None = None,
                        training: bool) -> tuple[Tensor, Tensor]:
        """:meth:`task_loss` on raw tensors: only shape checks, so it also runs under ``vmap``."""
        check_task_shapes(support_x, support_y, query_x, query_y)
        steps = self.default_steps(training) if steps is None else steps
        if training:
            adapted = self.adapt(model, params, support_x, support_y, steps=steps,
                                 create_graph=self.second_order, n_way=n_way)
            logits = self.query_logits(model, params, adapted, query_x)
        else:
            with torch.no_grad():
                adapted = self.adapt(model, params, support_x, support_y, steps=steps, create_graph=False, n_way=n_way)
                logits = self.query_logits(model, params, adapted, query_x)
        loss = F.cross_entropy(logits, query_y)
        accuracy = (logits.detach().argmax(dim=-1) == query_y).to(logits.dtype).mean()
        return loss, accuracy

    def default_steps(self, training: bool) -> int:
        return self.train_steps if training else self.test_steps

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class MAML(Learner):
    """Every parameter adapted by ``steps`` SGD steps on the support cross-entropy.

    ``first_order``: theta' = theta - lr * sg(g), so the meta-gradient is the query gradient at
    theta'; otherwise the inner gradient is part of the graph (second order).
    """

    name = "maml"

    def __init__(self, inner_lr: float = 0.01, train_steps: int = 1, test_steps: int = 1,
                 first_order: bool = False) -> None:
        _check_steps(train_steps, "train_steps")
        _check_steps(test_steps, "test_steps")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}")
        self.inner_lr = float(inner_lr)
        self.train_steps = train_steps
        self.test_steps = test_steps
        self.first_order = bool(first_order)

    @property
    def second_order(self) -> bool:  # type: ignore[override]
        return not self.first_order

    def adapt(self, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor, *,
              steps: int, create_graph: bool, n_way: int | None = None) -> ParamDict:
        _check_support(support_x, support_y)
        _check_steps(steps, "steps")

        def support_loss(weights: ParamDict) -> Tensor:
            return F.cross_entropy(functional_call(model, weights, (support_x,)), support_y)

        return self._sgd(support_loss, dict(params), steps, create_graph)

    def query_logits(self, model: nn.Module, params: ParamDict, adapted: ParamDict, query_x: Tensor) -> Tensor:
        return functional_call(model, adapted, (query_x,))

    def _sgd(self, loss_fn: Callable[[ParamDict], Tensor], weights: ParamDict, steps: int,
             create_graph: bool) -> ParamDict:
        return self.minimise(loss_fn, weights, steps, create_graph=create_graph)

    def minimise(self, loss_fn: Callable[[ParamDict], Tensor], weights: ParamDict, steps: int, *,
                 create_graph: bool, lr: float | None = None) -> ParamDict:
        """``steps`` SGD steps on ``loss_fn`` from ``weights`` (step ``lr``, default ``inner_lr``): the inner
        loop with any loss (BiDf-MKD adapts by distillation); second order when ``create_graph``."""
        lr = self.inner_lr if lr is None else lr
        for _ in range(steps):
            grads = inner_gradients(loss_fn, weights, create_graph=create_graph)
            weights = {name: w - lr * grads[name] for name, w in weights.items()}
        return weights


class ANIL(MAML):
    """MAML on the ``head.*`` parameters only; support features are computed once per inner loop."""

    name = "anil"

    def adapt(self, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor, *,
              steps: int, create_graph: bool, n_way: int | None = None) -> ParamDict:
        _check_support(support_x, support_y)
        _check_steps(steps, "steps")
        return self.adapt_head(model, params, backbone_features(model, params, support_x), support_y, steps=steps,
                               create_graph=create_graph)

    def adapt_head(self, model: nn.Module, params: ParamDict, features: Tensor, support_y: Tensor, *, steps: int,
                   create_graph: bool) -> ParamDict:
        """``params`` with the head adapted on support *features* (also mixed ones: TACO's task interpolation,
        dfml/methods/taco/interpolation.py)."""
        head = require_submodule(model, "head")
        head_weights = select_prefix(params, HEAD_PREFIX)
        if not head_weights:
            raise ValueError(f"ANIL adapts the '{HEAD_PREFIX}*' parameters but params has none: {sorted(params)}")

        def support_loss(weights: ParamDict) -> Tensor:
            logits = functional_call(head, strip_prefix(weights, HEAD_PREFIX), (features,))
            return F.cross_entropy(logits, support_y)

        return {**params, **self._sgd(support_loss, head_weights, steps, create_graph)}

    def logits_on_features(self, model: nn.Module, params: ParamDict, support_f: Tensor, support_y: Tensor,
                           query_f: Tensor, *, steps: int, create_graph: bool, n_way: int | None = None) -> Tensor:
        adapted = self.adapt_head(model, params, support_f, support_y, steps=steps, create_graph=create_graph)
        head = require_submodule(model, "head")
        return functional_call(head, strip_prefix(adapted, HEAD_PREFIX), (query_f,))


class ProtoNet(Learner):
    """Prototype = mean backbone feature per support class; logits = -squared Euclidean distance."""

    name = "protonet"

    def adapt(self, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor, *,
              steps: int = 0, create_graph: bool = False, n_way: int | None = None) -> Tensor:
        _check_support(support_x, support_y)
        return prototypes(backbone_features(model, params, support_x), support_y, n_way)

    def query_logits(self, model: nn.Module, params: ParamDict, prototypes: Tensor, query_x: Tensor) -> Tensor:
        return distance_logits(backbone_features(model, params, query_x), prototypes)

    def logits_on_features(self, model: nn.Module, params: ParamDict, support_f: Tensor, support_y: Tensor,
                           query_f: Tensor, *, steps: int = 0, create_graph: bool = False,
                           n_way: int | None = None) -> Tensor:
        """Query logits from support and query *features* (also mixed ones: TACO's task interpolation,
        dfml/methods/taco/interpolation.py)."""
        return distance_logits(query_f, prototypes(support_f, support_y, n_way))


def prototypes(features: Tensor, labels: Tensor, n_way: int | None = None) -> Tensor:
    """[n_way, dim]: the mean feature of each class."""
    if n_way is None:
        n_way = int(labels.max()) + 1
    # Comparison instead of F.one_hot: one_hot checks label values, which vmap cannot do.
    membership = (labels.unsqueeze(1) == torch.arange(n_way, device=labels.device)).to(features.dtype)
    return membership.T @ features / membership.sum(dim=0).unsqueeze(1)


def distance_logits(features: Tensor, centres: Tensor) -> Tensor:
    """-squared Euclidean distance of every feature to every centre: [n, n_way]."""
    return -((features.unsqueeze(1) - centres.unsqueeze(0)) ** 2).sum(dim=-1)


def backbone_features(model: nn.Module, params: ParamDict, images: Tensor) -> Tensor:
    """``model.backbone(images)`` evaluated with the ``backbone.*`` entries of ``params``."""
    backbone = require_submodule(model, "backbone")
    return functional_call(backbone, strip_prefix(params, BACKBONE_PREFIX), (images,))


LEARNER_NAMES = ("maml", "fomaml", "anil", "protonet")


def build_learner(name: str, **kwargs: Any) -> Learner:
    """``"maml"``, ``"fomaml"`` (MAML with ``first_order=True``), ``"anil"`` or ``"protonet"``."""
    if name == "maml":
        return MAML(**kwargs)
    if name == "fomaml":
        if not kwargs.pop("first_order", True):
            raise ValueError("'fomaml' is first-order MAML; use 'maml' for first_order=False")
        return MAML(first_order=True, **kwargs)
    if name == "anil":
        return ANIL(**kwargs)
    if name == "protonet":
        return ProtoNet(**kwargs)
    raise ValueError(f"unknown meta-learner {name!r}; available: {list(LEARNER_NAMES)}")


def _check_support(support_x: Tensor, support_y: Tensor) -> None:
    if support_y.dim() != 1 or support_x.shape[0] != support_y.shape[0]:
        raise ValueError(
            f"support_x has {support_x.shape[0]} images but support_y has shape {tuple(support_y.shape)}; "
            "need one label per support image"
        )


def _check_steps(steps: int, what: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {steps!r}")
