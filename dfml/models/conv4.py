"""Conv4 as used by PURER: four [conv3x3 -> BN -> ReLU -> maxpool2x2] blocks, 32 channels each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfml.models.base import init_conv_weight, make_batchnorm

CONV4_POOLINGS = ("flatten", "adaptive")
NUM_BLOCKS = 4
MIN_IMAGE_SIZE = 2**NUM_BLOCKS


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, through a faster kernel for contiguous NCHW CPU tensors.

    ATen's NCHW CPU max-pool is a scalar loop (measured 12 ms for 75 x 32 x 32 x 32, one thread,
    vs 1.5 ms channels-last); here the maximum and the first-maximum index come from a few
    vectorised element-wise ops (~4 ms) and the backward is ATen's own (differentiable again, so
    second-order MAML works). Identical values, indices and gradients; other tensors (CUDA,
    channels-last, inside torch.func transforms) take ``F.max_pool2d``.
    """
    if (
        x.device.type != "cpu"
        or x.dim() != 4
        or not x.is_contiguous()
        or x.shape[-1] < 2
        or x.shape[-2] < 2
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return F.max_pool2d(x, kernel_size=2)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _max_pool2x2_values(x)  # no backward: no indices to find (queries, evaluation)
    return _MaxPool2x2.apply(x)


def _max_pool2x2_values(x: torch.Tensor) -> torch.Tensor:
    """The values of 2x2/stride-2 max-pooling only: two element-wise maxima."""
    height, width = x.shape[-2:]
    window = x[..., : 2 * (height // 2), : 2 * (width // 2)]
    columns_max = torch.maximum(window[..., 0::2], window[..., 1::2])
    return torch.maximum(columns_max[..., 0::2, :], columns_max[..., 1::2, :])


def _max_pool2x2_with_indices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and flat (h * W + w) indices of 2x2/stride-2 max-pooling; ties go to the first element
    in row-major window order, as in ATen (strict ``>`` below)."""
    height, width = x.shape[-2:]
    half_h, half_w = height // 2, width // 2
    window = x[..., : 2 * half_h, : 2 * half_w]
    left, right = window[..., 0::2], window[..., 1::2]
    take_right = right > left
    columns_max = torch.maximum(left, right)
    top, bottom = columns_max[..., 0::2, :], columns_max[..., 1::2, :]
    take_bottom = bottom > top
    values = torch.maximum(top, bottom)
    column = torch.where(take_bottom, take_right[..., 1::2, :], take_right[..., 0::2, :])
    base = (torch.arange(half_h, device=x.device) * (2 * width)).view(-1, 1) + torch.arange(
        half_w, device=x.device
    ) * 2
    indices = torch.add(base, take_bottom, alpha=width).add_(column)
    return values, indices


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        values, indices = _max_pool2x2_with_indices(x)
        ctx.save_for_backward(x, indices)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, batch_stats_only: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm = make_batchnorm(out_channels, batch_stats_only)
        init_conv_weight(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(F.relu(self.norm(self.conv(x))))


class Conv4Backbone(nn.Module):
    """``pooling="flatten"`` keeps the spatial map (fixed input size); ``"adaptive"`` max-pools to 1x1."""

    def __init__(self, in_channels: int, width: int, batch_stats_only: bool, pooling: str) -> None:
        super().__init__()
        if pooling not in CONV4_POOLINGS:
            raise ValueError(f"conv4 pooling must be one of {list(CONV4_POOLINGS)}, got {pooling!r}")
        channels = [in_channels] + [width] * NUM_BLOCKS
        self.blocks = nn.Sequential(
            *(ConvBlock(c_in, c_out, batch_stats_only) for c_in, c_out in zip(channels, channels[1:]))
        )
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.pooling == "adaptive":
            x = F.adaptive_max_pool2d(x, 1)
        return torch.flatten(x, start_dim=1)


def conv4_feature_dim(width: int, image_size: int, pooling: str) -> int:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"conv4 halves the image {NUM_BLOCKS} times and needs image_size >= {MIN_IMAGE_SIZE}, "
            f"got {image_size}"
        )
    if pooling == "adaptive":
        return width
    return width * (image_size // MIN_IMAGE_SIZE) ** 2
