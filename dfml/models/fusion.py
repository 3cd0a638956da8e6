"""Parameter-space fusion of a pool into the Conv4 meta-model: the Average and OTA baselines of PURER's
table, and the SS meta-model's initialisation. Both need members shaped like the meta-model. The meta-model
of every meta-training method is built here (:func:`build_meta_model`, :func:`choose_init`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dfml.models.averaging import StateDict, average_state_dicts, load_state_into
from dfml.models.base import FewShotNet
from dfml.models.registry import build_model
from dfml.models.ota import ota_fuse

FUSIONS = {"average": average_state_dicts, "ota": ota_fuse}
BASELINE_INITS = ("random", *FUSIONS)
LEARNERS = ("maml", "fomaml", "anil", "protonet")


def baseline_parts(name: str) -> tuple[str, str | None]:
    """A baseline's meta-model and the learner it is scored with: ``average`` -> (average, None: metatrain's
    learner), ``average_protonet`` -> (average, protonet), so a method meta-tested with its own learner (TACO:
    ProtoNet) has a baseline scored the same way."""
    init, _, learner = name.partition("_")
    if init not in BASELINE_INITS or (learner and learner not in LEARNERS):
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(BASELINE_INITS)}, optionally "
                         f"followed by _<learner> ({', '.join(LEARNERS)}), e.g. average_protonet")
    return init, learner or None


def baseline_method(name: str) -> dict:
    """A baseline as a method entry for dfml.config.method_metatrain: its learner when it names one."""
    learner = baseline_parts(name)[1]
    return {"learner": learner} if learner else {}


def can_fuse(members: Iterable[tuple[str, int | None]], meta_width: int, meta_pooling: str) -> bool:
    """True when every member (architecture name, width) is a conv4 of the meta-model's width and the
    meta-model flattens its feature map like the members: only then do parameters correspond."""
    return meta_pooling == "flatten" and all(name == "conv4" and (width or 32) == meta_width for name, width in members)


def architectures(pool_models: Sequence[FewShotNet]) -> list[tuple[str, int | None]]:
    """(architecture name, width) of every member: what :func:`can_fuse` compares with the meta-model."""
    return [(m.config()["name"], m.config()["width"]) for m in pool_models]


def fuse_into(meta_model: nn.Module, states: Sequence[nn.Module | StateDict], how: str) -> nn.Module:
    """Load the ``how`` fusion (``average`` or ``ota``) of ``states`` into ``meta_model`` (in place)."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; expected one of {sorted(FUSIONS)}")
    return load_state_into(meta_model, FUSIONS[how](states), what=f"the {how} fusion")


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
    return "average" if can_fuse(members, width, pooling) else "random"
