"""Parameter-space fusion of a pool into the Conv4 meta-model: the Average and OTA baselines of PURER's
table, and the SS meta-model's initialisation. Both need members shaped like the meta-model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from dfml.models.averaging import StateDict, average_state_dicts, load_state_into
from dfml.models.ota import ota_fuse

FUSIONS = {"average": average_state_dicts, "ota": ota_fuse}


def can_fuse(members: Iterable[tuple[str, int | None]], meta_width: int, meta_pooling: str) -> bool:
    """True when every member (architecture name, width) is a conv4 of the meta-model's width and the
    meta-model flattens its feature map like the members: only then do parameters correspond."""
    return meta_pooling == "flatten" and all(name == "conv4" and (width or 32) == meta_width for name, width in members)


def fuse_into(meta_model: nn.Module, states: Sequence[nn.Module | StateDict], how: str) -> nn.Module:
    """Load the ``how`` fusion (``average`` or ``ota``) of ``states`` into ``meta_model`` (in place)."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; expected one of {sorted(FUSIONS)}")
    return load_state_into(meta_model, FUSIONS[how](states), what=f"the {how} fusion")
