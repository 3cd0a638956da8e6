"""Parameter-space fusion of a pool into the Conv4 meta-model: the Average and OTA baselines of PURER's
table, and the SS meta-model's initialisation. Both need members shaped like the meta-model. The meta-model
of every meta-training method is built here (:func:`build_meta_model`, :func:`choose_init`). The fusions
themselves are imported by name (dfml.baselines.FUSIONS) when one is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from dfml.baselines import AUTO_FUSION, BASELINE_INITS, FUSIONS, LEARNERS, baseline_method, baseline_parts
from dfml.models.averaging import StateDict, load_state_into
from dfml.models.base import FewShotNet
from dfml.models.registry import build_model

__all__ = ["AUTO_FUSION", "BASELINE_INITS", "FUSIONS", "LEARNERS", "architectures", "baseline_method",
           "baseline_parts", "build_meta_model", "can_fuse", "choose_init", "fuse_into", "fusion_function"]


def can_fuse(members: Iterable[tuple[str, int | None]], meta_width: int, meta_pooling: str) -> bool:
    """True when every member (architecture name, width) is a conv4 of the meta-model's width and the
    meta-model flattens its feature map like the members: only then do parameters correspond."""
    return meta_pooling == "flatten" and all(name == "conv4" and (width or 32) == meta_width for name, width in members)


def architectures(pool_models: Sequence[FewShotNet]) -> list[tuple[str, int | None]]:
    """(architecture name, width) of every member: what :func:`can_fuse` compares with the meta-model."""
    return [(m.config()["name"], m.config()["width"]) for m in pool_models]


def fusion_function(how: str) -> Callable[[Sequence[nn.Module | StateDict]], StateDict]:
    """The function of the ``how`` fusion (dfml.baselines.FUSIONS), imported on first use."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; expected one of {sorted(FUSIONS)}")
    module, function = FUSIONS[how]
    return getattr(importlib.import_module(module), function)


def fuse_into(meta_model: nn.Module, states: Sequence[nn.Module | StateDict], how: str) -> nn.Module:
    """Load the ``how`` fusion (``average`` or ``ota``) of ``states`` into ``meta_model`` (in place)."""
    return load_state_into(meta_model, fusion_function(how)(states), what=f"the {how} fusion")


def build_meta_model(pool_models: list[FewShotNet], init: str, *, way: int, in_channels: int, image_size: int,
                     width: int = 32, pooling: str = "flatten", seed: int = 0) -> FewShotNet:
    """Conv4 meta-model with batch-statistics BN: ``random``, or a parameter fusion of a conv4 pool
    (``average``, ``ota``: dfml.models.fusion)."""
    torch.manual_seed(seed)
    model = build_model("conv4", way, in_channels, image_size, width=width, batch_stats_only=True, pooling=pooling)
    if init in FUSIONS:
        members = architectures(pool_models)
        if not can_fuse(members, width, pooling):
            raise ValueError(f"{init} fuses parameters and needs a pool of conv4 members of width {width} and a "
                             f"flatten-pooled meta-model; this pool has {sorted(set(members))} (pooling {pooling}): "
                             f"use init 'random' for heterogeneous (SH/MH) pools")
        fuse_into(model, [m.state_dict() for m in pool_models], init)
    elif init != "random":
        raise ValueError(f"unknown meta-model init {init!r}; expected 'random' or one of {sorted(FUSIONS)}")
    return model


def choose_init(requested: str, pool_models: list[FewShotNet], width: int, pooling: str) -> str:
    """``auto``: the average of the pool when it can be fused into the meta-model, else ``random``."""
    if requested != "auto":
        return requested
    members = architectures(pool_models)
    return AUTO_FUSION if can_fuse(members, width, pooling) else "random"
