"""TGR's implicit gradient regulariser across the teachers of one group (METHODS 4.4).

Per teacher i a loss L_i(theta) with gradient g_i; g_bar is their mean. Each teacher's loss is evaluated at
its own displaced point theta_i' = theta - eta * (g_bar - g_i) (``displace_lr`` eta), and the update
direction is the mean over i of the gradients there. To first order in eta this descends

* ``through_displacement`` (the official code: g_i kept in the graph, the gradient taken w.r.t. theta, so it
  also flows through theta_i''s dependence on theta): L_bar + (eta / n) * sum_i ||g_i - g_bar||^2;
* otherwise (the gradient w.r.t. theta_i', the displacement held fixed; METHODS' first-order reading):
  L_bar + (eta / 2n) * sum_i ||g_i - g_bar||^2;

both penalise the variance of the teachers' gradients (tests/methods/test_tgr.py checks each expansion).
``regularise=False`` gives the plain mean gradient of the L_i (the study's "no regulariser" arm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from dfml.meta.params import ParamDict

LossFn = Callable[[ParamDict], Tensor]


@dataclass
class RegularisedGradient:
    """The update ``direction`` per parameter, the teachers' mean loss at theta, and the gradient variance
    (1/n) sum_i ||g_i - g_bar||^2 at theta (nan without the regulariser: not computed)."""

    direction: ParamDict
    loss: Tensor
    gradient_variance: float


def regularised_gradient(losses: Sequence[LossFn], params: ParamDict, displace_lr: float, *,
                         regularise: bool = True, through_displacement: bool = True) -> RegularisedGradient:
    """The mean over teachers of grad L_i at theta_i' = theta - displace_lr * (g_bar - g_i) (module docstring);
    ``params`` are the leaves the direction is for (they must require grad)."""
    if not losses:
        raise ValueError("the regulariser needs at least one teacher's loss")
    names, leaves = list(params), list(params.values())
    values = [loss_fn(params) for loss_fn in losses]
    mean_loss = torch.stack(values).mean().detach()
    create_graph = regularise and through_displacement
    grads = [torch.autograd.grad(value, leaves, create_graph=create_graph) for value in values]
    mean_grad = [torch.stack(per_teacher).mean(0) for per_teacher in zip(*grads)]
    if not regularise:
        return RegularisedGradient(dict(zip(names, mean_grad)), mean_loss, float("nan"))
    variance = sum(float(sum(((g - m) ** 2).sum() for g, m in zip(g_i, mean_grad)).detach()) for g_i in grads)
    displaced = [{name: w - displace_lr * (m - g) for name, w, m, g in zip(names, leaves, mean_grad, g_i)}
                 for g_i in grads]
    if through_displacement:
        total = torch.stack([loss_fn(point) for loss_fn, point in zip(losses, displaced)]).mean()
        direction = torch.autograd.grad(total, leaves)
    else:
        direction = [torch.zeros_like(w) for w in leaves]
        for loss_fn, point in zip(losses, displaced):
            point = {name: w.detach().requires_grad_() for name, w in point.items()}
            for total, g in zip(direction, torch.autograd.grad(loss_fn(point), list(point.values()))):
                total += g / len(losses)
    return RegularisedGradient(dict(zip(names, (d.detach() for d in direction))), mean_loss,
                               variance / len(losses))
