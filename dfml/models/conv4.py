"""Conv4 as used by PURER: four [conv3x3 -> BN -> ReLU -> maxpool2x2] blocks, 32 channels each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfml.models.base import init_conv_weight, make_batchnorm

CONV4_POOLINGS = ("flatten", "adaptive")
NUM_BLOCKS = 4
MIN_IMAGE_SIZE = 2**NUM_BLOCKS


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, batch_stats_only: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm = make_batchnorm(out_channels, batch_stats_only)
        init_conv_weight(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


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
