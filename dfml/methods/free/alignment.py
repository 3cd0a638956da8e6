"""BELL (FREE, METHODS 4.3): implicit gradient alignment across tasks, one Reptile step over sequential updates.

theta~ starts as a copy of theta; for the tasks 1..n in turn, one optimiser step on task i's loss at theta~;
then theta's gradient is ``scale * (theta - theta~)`` and the caller's optimiser takes one step. With plain
SGD of step a, to second order the direction is a * [sum_i g_i - a * sum_{i<j} H_j g_i] (g_i, H_j: gradient
and Hessian at theta), and in expectation over the task order the second part is the gradient of
-a/2 * sum_{i<j} <g_i, g_j>: descending it rewards tasks whose gradients agree (the Reptile / Fish expansion).

The sequential steps use one optimiser built per call (:func:`sequential_steps`'s ``optimizer``, FREE: a fresh
Adam at lr 1e-3 on the copy, as the official code does), so nothing of it outlives the update; theta's own
optimiser (the meta-model's Adam) keeps its moments across calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from dfml.meta.params import ParamDict

LossFn = Callable[[ParamDict], Tensor]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def sequential_steps(params: ParamDict, losses: Sequence[LossFn], optimizer: OptimizerFactory) -> tuple[
        ParamDict, list[float]]:
    """theta~ after one step of ``optimizer(copy of theta)`` per loss, in order; and each loss where it was
    taken (task i's at the weights the steps on tasks 1..i-1 left). ``params`` are not modified."""
    if not losses:
        raise ValueError("sequential steps need at least one task loss")
    adapted = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    stepper = optimizer(list(adapted.values()))
    values = []
    for loss_fn in losses:
        loss = loss_fn(adapted)
        stepper.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
        values.append(float(loss.detach()))
    return {name: w.detach() for name, w in adapted.items()}, values


def reptile_direction(params: ParamDict, adapted: ParamDict, scale: float) -> ParamDict:
    """``scale * (theta - theta~)``: the gradient a Reptile step hands to theta's optimiser."""
    return {name: scale * (p.detach() - adapted[name]) for name, p in params.items()}


def aligned_update(params: ParamDict, losses: Sequence[LossFn], meta_optimizer: torch.optim.Optimizer, *,
                   optimizer: OptimizerFactory, scale: float) -> list[float]:
    """One BELL update of ``params`` (leaves of ``meta_optimizer``): :func:`sequential_steps`, then
    :func:`reptile_direction` as their gradient and one ``meta_optimizer`` step. Returns the task losses."""
    adapted, values = sequential_steps(params, losses, optimizer)
    for name, gradient in reptile_direction(params, adapted, scale).items():
        params[name].grad = gradient
    meta_optimizer.step()
    meta_optimizer.zero_grad(set_to_none=True)
    return values


def adam(lr: float) -> OptimizerFactory:
    """A fresh ``torch.optim.Adam(lr)`` (default betas) over the given tensors: FREE's sequential steps."""
    return lambda tensors: torch.optim.Adam(tensors, lr=lr)
