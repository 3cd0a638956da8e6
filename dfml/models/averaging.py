"""Parameter averaging (FedAvg) of a same-architecture pool, used to initialise the SS meta-model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
RUNNING_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def as_state_dict(model_or_state: nn.Module | StateDict) -> StateDict:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    return model_or_state


def check_same_layouts(states: Sequence[StateDict], action: str = "average") -> None:
    """Raise ``ValueError`` (``"cannot {action}: ..."``) naming the first key that is missing,
    unexpected or mis-shaped in some state dict compared with ``states[0]``."""
    reference = states[0]
    for index, other in enumerate(states[1:], start=1):
        for key, tensor in reference.items():
            if key not in other:
                raise ValueError(
                    f"cannot {action}: key {key!r} of state dict 0 is missing from state dict {index} "
                    "(different architectures?)"
                )
            if other[key].shape != tensor.shape:
                raise ValueError(
                    f"cannot {action}: key {key!r} has shape {tuple(tensor.shape)} in state dict 0 "
                    f"but {tuple(other[key].shape)} in state dict {index}"
                )
        for key in other:
            if key not in reference:
                raise ValueError(
                    f"cannot {action}: key {key!r} of state dict {index} is missing from state dict 0 "
                    "(different architectures?)"
                )


def average_state_dicts(models_or_states: Sequence[nn.Module | StateDict]) -> dict[str, torch.Tensor]:
    """Element-wise mean of every floating tensor (weights and BN running buffers).

    Integer tensors (BN ``num_batches_tracked``) take the maximum.
    """
    states = [as_state_dict(item) for item in models_or_states]
    if not states:
        raise ValueError("cannot average an empty list of models")
    check_same_layouts(states)

    averaged = {}
    for key, tensor in states[0].items():
        stacked = torch.stack([state[key].detach().to(tensor.device) for state in states])
        averaged[key] = stacked.mean(dim=0) if tensor.is_floating_point() else stacked.amax(dim=0)
    return averaged


def _is_absent_running_buffer(model: nn.Module, key: str) -> bool:
    """True for a BN running-statistics key whose layer in ``model`` keeps no running stats."""
    module_path, _, buffer_name = key.rpartition(".")
    if buffer_name not in RUNNING_BUFFER_NAMES:
        return False
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return False
    return isinstance(module, nn.BatchNorm2d) and not module.track_running_stats


def load_average_into(
    meta_model: nn.Module, models_or_states: Sequence[nn.Module | StateDict]
) -> nn.Module:
    """Load the pool average into ``meta_model`` (in place, see ``load_state_into``) and return it."""
    return load_state_into(meta_model, average_state_dicts(models_or_states), what="the average")


def load_state_into(meta_model: nn.Module, state: StateDict, *, what: str = "the fused state") -> nn.Module:
    """Load a state dict fused from the pool into ``meta_model`` (in place) and return it.

    Running buffers are dropped for BN layers that keep none (a ``batch_stats_only`` meta-model);
    any other missing, unexpected or mis-shaped key raises ``ValueError`` (``"cannot load {what}:
    ..."``) naming it.
    """
    target = meta_model.state_dict()
    to_load = {}
    for key, tensor in state.items():
        if key in target:
            if target[key].shape != tensor.shape:
                raise ValueError(
                    f"cannot load {what}: key {key!r} has shape {tuple(tensor.shape)} in the "
                    f"pool but {tuple(target[key].shape)} in the meta-model"
                )
            to_load[key] = tensor
        elif not _is_absent_running_buffer(meta_model, key):
            raise ValueError(f"cannot load {what}: pool key {key!r} does not exist in the meta-model")
    missing = [key for key in target if key not in to_load]
    if missing:
        raise ValueError(f"cannot load {what}: meta-model keys missing from the pool: {missing}")
    meta_model.load_state_dict(to_load, strict=True)
    return meta_model
