"""Differentiable augmentation applied to generated images before a teacher/API query (METHODS 4.1, 4.2).

Gradients must reach the generator through the augmentation, so everything here is plain
tensor indexing and arithmetic; randomness comes only from the caller's ``torch.Generator``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(images: Tensor, rng: torch.Generator, padding: int = 4, flip: bool = True) -> Tensor:
    """Differentiable augmentation before a teacher/API query: each image independently gets a random crop of the
    zero-padded image (offsets in [0, 2*padding]) and, with flip, a horizontal flip with probability 1/2.
    Per image, unlike torchvision transforms applied to a batched tensor (one crop and flip for the whole batch:
    METHODS 6.2.4).

    ``images`` is [N, C, H, W]; the output has the same shape. Draw order from ``rng`` (CPU), always
    in this order so a caller can reproduce it:

    1. ``rows = torch.randint(0, 2 * padding + 1, (N,), generator=rng)`` (drawn even when padding is 0),
    2. ``cols = torch.randint(0, 2 * padding + 1, (N,), generator=rng)``,
    3. only if ``flip``: ``flipped = torch.rand(N, generator=rng) < 0.5``.

    Image n is ``F.pad(images, [padding] * 4)[n, :, rows[n]:rows[n]+H, cols[n]:cols[n]+W]``, then
    mirrored along W if ``flipped[n]``. Crop and flip are one advanced-indexing gather, so the
    backward is a scatter-add into the input. With ``padding == 0`` and ``flip=False`` the input
    itself is returned.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {list(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, channels, height, width = images.shape
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    if padding == 0 and not flip:
        return images
    row_index = rows[:, None] + torch.arange(height)
    ascending = torch.arange(width)
    col_index = cols[:, None] + ascending
    if flip:
        flipped = torch.rand(n, generator=rng) < 0.5
        col_index = torch.where(flipped[:, None], cols[:, None] + ascending.flip(0), col_index)
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        row_index.to(device)[:, None, :, None],
        col_index.to(device)[:, None, None, :],
    ]


def _channel_values(values: Sequence[float], channels: int, name: str, like: Tensor) -> Tensor:
    """``values`` as a [C, 1, 1] tensor; one value broadcasts to every channel."""
    tensor = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if tensor.numel() not in (1, channels):
        raise ValueError(f"{name} must have 1 or {channels} values, got {tensor.numel()}")
    return tensor.expand(channels).reshape(channels, 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel; mean/std are sequences of 1 or C floats (1 broadcasts to every channel);
    differentiable.

    ``images`` is [..., C, H, W] (channels third from last), e.g. [N, C, H, W].
    """
    if images.dim() < 3:
        raise ValueError(f"images must have shape [..., C, H, W], got {list(images.shape)}")
    channels = images.shape[-3]
    mean_t = _channel_values(mean, channels, "mean", images)
    std_t = _channel_values(std, channels, "std", images)
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be > 0, got {list(std_t.flatten().tolist())}")
    return (images - mean_t) / std_t
