"""Few-shot ResNet-10/18 (CloserLookFewShot style, PURER stem): works for any input size.

Stem: 3x3 conv, stride 1, + BN, with no ReLU and no max-pool (as in PURER's network.py).
Four stages of basic blocks at widths w, 2w, 4w, 8w (w = 64 by default); stages 2-4 start with
stride 2; global average pool gives an 8w-dimensional feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfml.models.base import init_conv_weight, make_batchnorm

BLOCKS_PER_STAGE = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}
STAGE_WIDTH_MULTIPLIERS = (1, 2, 4, 8)


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, batch_stats_only: bool
) -> nn.Sequential:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )
    init_conv_weight(conv)
    return nn.Sequential(conv, make_batchnorm(out_channels, batch_stats_only))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_stats_only: bool) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride, batch_stats_only)
        self.conv2 = conv_bn(out_channels, out_channels, 3, 1, batch_stats_only)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            conv_bn(in_channels, out_channels, 1, stride, batch_stats_only)
            if needs_projection
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    def __init__(
        self, blocks_per_stage: tuple[int, ...], in_channels: int, width: int, batch_stats_only: bool
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, width, 3, 1, batch_stats_only)
        stages = []
        channels = width
        for stage_index, (num_blocks, multiplier) in enumerate(
            zip(blocks_per_stage, STAGE_WIDTH_MULTIPLIERS)
        ):
            out_channels = width * multiplier
            first_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, batch_stats_only))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), start_dim=1)
