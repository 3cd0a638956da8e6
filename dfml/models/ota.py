"""OTA baseline: model fusion by optimal transport (Singh & Jaggi, NeurIPS 2020), for a conv4 pool.

Weight-based alignment with exact assignment: with equal layer widths and uniform neuron masses
the optimal transport plan is a permutation, found by ``scipy.optimize.linear_sum_assignment``.
Every member's hidden channels are permuted, block by block, to match a reference member, and the
aligned pool is then averaged like ``average_state_dicts``. The ground cost between two channels is
the squared Euclidean distance of their incoming weights: the 3x3 conv kernel (input channels
already aligned) flattened, plus the conv bias. The BatchNorm affine parameters and running
statistics are not part of the cost; they move with their channel. Image channels (the input of
block 0) and the head's classes are never permuted: class k of every member stays class k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from dfml.models.averaging import StateDict, as_state_dict, average_state_dicts, check_same_layouts
from dfml.models.conv4 import NUM_BLOCKS

_BLOCK_KEYS = ("conv.weight", "conv.bias", "norm.weight", "norm.bias")
_RUNNING_KEYS = ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked")
_PER_CHANNEL_KEYS = ("conv.weight", "conv.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")
_HEAD_KEYS = ("head.weight", "head.bias")
_EXPECTED = (
    f"backbone.blocks.{{0..{NUM_BLOCKS - 1}}}.conv.{{weight,bias}}, "
    f"backbone.blocks.{{0..{NUM_BLOCKS - 1}}}.norm.{{weight,bias}} (+ optional running statistics), "
    "head.{weight,bias}"
)


def _prefix(block: int) -> str:
    return f"backbone.blocks.{block}."


def _check_conv4(state: StateDict) -> None:
    required = {_prefix(b) + name for b in range(NUM_BLOCKS) for name in _BLOCK_KEYS} | set(_HEAD_KEYS)
    optional = {_prefix(b) + name for b in range(NUM_BLOCKS) for name in _RUNNING_KEYS}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - required - optional)
    if missing or unexpected:
        raise ValueError(
            f"OTA fusion needs a conv4 state dict with keys {_EXPECTED}; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            + (" ..." if len(missing) > 5 or len(unexpected) > 5 else "")
        )
    width = state[_prefix(NUM_BLOCKS - 1) + "conv.weight"].shape[0]
    if state["head.weight"].shape[1] % width:
        raise ValueError(
            f"OTA fusion needs a conv4 state dict whose head input is a multiple of the last block's "
            f"{width} channels, got head.weight of shape {tuple(state['head.weight'].shape)}"
        )


def _incoming_weights(state: StateDict, prefix: str) -> torch.Tensor:
    weight = state[prefix + "conv.weight"]
    return torch.cat([weight.flatten(1), state[prefix + "conv.bias"].unsqueeze(1)], dim=1)


def _match(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``perm`` such that ``other[perm[i]]`` is the neuron matched to ``reference[i]``."""
    cost = torch.cdist(
        reference.detach().cpu().double(), other.detach().cpu().double(),
        compute_mode="donot_use_mm_for_euclid_dist",
    ).pow(2)
    _, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(columns, dtype=torch.long)


def _take(tensor: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, perm.to(tensor.device))


def align_to_reference(reference: StateDict, other: StateDict) -> dict[str, torch.Tensor]:
    """``other`` with its hidden channels permuted block by block to match ``reference``.

    The permuted network computes the same function as ``other``.
    """
    check_same_layouts([reference, other], action="align")
    _check_conv4(reference)
    aligned = {key: tensor.detach().clone() for key, tensor in other.items()}
    perm = None
    for block in range(NUM_BLOCKS):
        prefix = _prefix(block)
        if perm is not None:
            aligned[prefix + "conv.weight"] = _take(aligned[prefix + "conv.weight"], 1, perm)
        perm = _match(_incoming_weights(reference, prefix), _incoming_weights(aligned, prefix))
        for name in _PER_CHANNEL_KEYS:
            if prefix + name in aligned:
                aligned[prefix + name] = _take(aligned[prefix + name], 0, perm)
    # Head features are the flattened [C, h, w] map (h * w = 1 for adaptive pooling): channel c owns
    # the block of columns c * h * w ... (c + 1) * h * w - 1.
    head = aligned["head.weight"]
    classes, features = head.shape
    aligned["head.weight"] = _take(head.view(classes, len(perm), -1), 1, perm).reshape(classes, features)
    return aligned


def ota_fuse(states: Sequence[nn.Module | StateDict], reference: int = 0) -> dict[str, torch.Tensor]:
    """Align every member to ``states[reference]``, then average (``average_state_dicts``)."""
    states = [as_state_dict(item) for item in states]
    if not states:
        raise ValueError("cannot fuse an empty list of models")
    if not 0 <= reference < len(states):
        raise ValueError(f"reference index {reference} is out of range for {len(states)} models")
    check_same_layouts(states, action="fuse")
    _check_conv4(states[0])
    anchor = states[reference]
    return average_state_dicts(
        [state if index == reference else align_to_reference(anchor, state) for index, state in enumerate(states)]
    )
