"""Model access as data: a pool member is either white-box (weights, BN statistics, gradients) or a
black-box API (logits only).

A scenario says the most its pool's owners allow (``access``); a method says what it needs
(``MetaTrainingMethod.access``). A black-box method never sees a member: it is handed a
:class:`BlackBoxAPI`, a query function that returns logits with no parameters behind it and no gradient
through it, and that counts every image it is asked about (the run's API budget).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor

ACCESS = ("white_box", "black_box")


class AccessError(ValueError):
    """A method asked for more access than the scenario's pool allows."""


def check_access(scenario_name: str, scenario_access: str, method_name: str, method_access: str) -> None:
    """Refuse a white-box method on a pool whose members are only reachable as black-box APIs."""
    for what, value in (("scenario access", scenario_access), ("method access", method_access)):
        if value not in ACCESS:
            raise AccessError(f"{what} must be one of {ACCESS}, got {value!r}")
    if scenario_access == "black_box" and method_access == "white_box":
        raise AccessError(f"scenario {scenario_name!r} exposes its pool as black-box APIs (logits only) but method "
                          f"{method_name!r} needs white-box members (weights, BN statistics, gradients)")


class BlackBoxAPI:
    """One pool member behind a query interface: ``api(images) -> logits`` (detached, no gradient).

    The model lives only in a closure, so the object has no parameters, no state dict, no modules to
    reach for; the output never requires grad, so nothing can back-propagate into the member (that is
    what a zero-order estimator is for). ``queries`` counts images asked about (one per row of every
    call), the unit BiDf-MKD's budget is counted in. ``classes`` are the API's label names in logit order.
    """

    __slots__ = ("_forward", "classes", "dataset", "queries", "seconds")

    def __init__(self, forward: Callable[[Tensor], Tensor], classes: Sequence[str], dataset: str):
        self._forward = forward
        self.classes = list(classes)
        self.dataset = dataset
        self.queries = 0
        self.seconds = 0.0  # wall time spent answering (where a black-box method's time goes)

    @classmethod
    def from_model(cls, model: torch.nn.Module, classes: Sequence[str], dataset: str) -> BlackBoxAPI:
        model.eval()  # an API answers each image on its own: BN with running statistics

        def forward(images: Tensor) -> Tensor:
            with torch.no_grad():
                return model(images)

        return cls(forward, classes, dataset)

    @classmethod
    def from_member(cls, member) -> BlackBoxAPI:
        """A :class:`dfml.pool.PoolMember` as an API (its dataset-qualified class names)."""
        return cls.from_model(member.model, member.qualified_classes, member.card["dataset"])

    def __call__(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"an API is queried with images [N, C, H, W], got shape {tuple(images.shape)}")
        self.queries += images.shape[0]
        start = time.perf_counter()
        logits = self._forward(images.detach()).detach()
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # time the answer, not the kernel launch
        self.seconds += time.perf_counter() - start
        return logits

    def __repr__(self) -> str:
        return f"BlackBoxAPI({self.dataset}, {len(self.classes)} classes, {self.queries} queries)"


def total_queries(apis: Sequence[BlackBoxAPI]) -> int:
    return sum(api.queries for api in apis)


def total_seconds(apis: Sequence[BlackBoxAPI]) -> float:
    return sum(api.seconds for api in apis)
