"""Explicit parameter dicts of a FewShotNet: its ``backbone.`` / ``head.`` halves and their gradients.

Shared by the meta-learners (ANIL adapts ``head.*``) and ICFIL (calibrates ``backbone.*``, then ``head.*``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

ParamDict = dict[str, Tensor]

HEAD_PREFIX = "head."
BACKBONE_PREFIX = "backbone."


def select_prefix(params: ParamDict, prefix: str) -> ParamDict:
    """The entries whose names start with ``prefix``, names unchanged."""
    return {name: w for name, w in params.items() if name.startswith(prefix)}


def strip_prefix(params: ParamDict, prefix: str) -> ParamDict:
    """The entries whose names start with ``prefix``, named as inside that submodule."""
    return {name[len(prefix):]: w for name, w in params.items() if name.startswith(prefix)}


def require_submodule(model: nn.Module, name: str) -> nn.Module:
    submodule = getattr(model, name, None)
    if not isinstance(submodule, nn.Module):
        raise ValueError(f"dfml needs a model with a '{name}' submodule (FewShotNet layout)")
    return submodule


def loss_and_gradients(loss_fn: Callable[[ParamDict], Tensor], weights: ParamDict, *,
                       create_graph: bool = False) -> tuple[Tensor, ParamDict]:
    """``loss_fn(weights)`` (detached) and its gradient w.r.t. every entry of ``weights``.

    Entries that do not require grad become fresh leaves; entries that do keep their graph, so with
    ``create_graph`` the gradients stay differentiable w.r.t. what produced them (second order).
    Unused entries get zero gradients.
    """
    # enable_grad: evaluation runs under no_grad but still needs these gradients.
    with torch.enable_grad():
        leaves = {name: w if w.requires_grad else w.detach().requires_grad_() for name, w in weights.items()}
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
    return loss.detach(), dict(zip(leaves, grads))
