"""The shared shape of every few-shot classifier: a feature backbone followed by a linear head.

Parameter names start with ``backbone.`` or ``head.``; ANIL adapts only ``head.*`` and ICFIL
calibrates ``backbone.*``, so keep both attribute names stable.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class FewShotNet(nn.Module):
    """``forward(x) = head(backbone(x))`` with ``backbone: [B, C, H, W] -> [B, feature_dim]``."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        architecture: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.head.bias)
        self._architecture = copy.deepcopy(architecture)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs such that ``build_model(**config)`` rebuilds this architecture."""
        if self._architecture is None:
            raise ValueError(
                "this FewShotNet was assembled by hand, not by dfml.models.build_model, "
                "so it has no config that rebuilds it"
            )
        return copy.deepcopy(self._architecture)

    @property
    def batch_stats_only(self) -> bool:
        """True when no BatchNorm layer keeps running statistics (the PURER meta-model)."""
        norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        return bool(norms) and not any(m.track_running_stats for m in norms)


def make_batchnorm(channels: int, batch_stats_only: bool) -> nn.BatchNorm2d:
    """A plain BatchNorm2d; without running stats it normalises with batch statistics in eval too."""
    norm = nn.BatchNorm2d(channels, track_running_stats=not batch_stats_only)
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    return norm


def init_conv_weight(conv: nn.Conv2d) -> None:
    """He init with fan-out: N(0, 2 / (k_h * k_w * C_out)), as in PURER / CloserLookFewShot."""
    kernel_h, kernel_w = conv.kernel_size
    std = math.sqrt(2.0 / (kernel_h * kernel_w * conv.out_channels))
    nn.init.normal_(conv.weight, mean=0.0, std=std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
