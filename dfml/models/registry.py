"""Build any supported few-shot architecture by name."""

from __future__ import annotations

from dfml.models.base import FewShotNet
from dfml.models.conv4 import CONV4_POOLINGS, Conv4Backbone, conv4_feature_dim
from dfml.models.resnet import BLOCKS_PER_STAGE, ResNetBackbone

DEFAULT_WIDTHS = {"conv4": 32, "resnet10": 64, "resnet18": 64}
MODEL_NAMES = tuple(DEFAULT_WIDTHS)
POOLINGS = CONV4_POOLINGS


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    *,
    width: int | None = None,
    batch_stats_only: bool = False,
    pooling: str = "flatten",
) -> FewShotNet:
    """Build ``name`` (one of ``MODEL_NAMES``) with a ``num_classes``-way linear head.

    ``width``: conv4 channels per block (default 32) or ResNet base width (default 64).
    ``batch_stats_only``: every BatchNorm normalises with the current batch statistics, in train
    and eval mode, and keeps no running buffers (the PURER meta-model).
    ``pooling``: for conv4, ``"flatten"`` (feature dim ``width * (image_size // 16) ** 2``, fixed
    input size) or ``"adaptive"`` (1x1 adaptive max-pool, feature dim ``width``, any input size).
    ResNets always global-average-pool, so both values give the same network for them.
    """
    if name not in DEFAULT_WIDTHS:
        raise ValueError(f"unknown model name {name!r}; available: {list(MODEL_NAMES)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    width = DEFAULT_WIDTHS[name] if width is None else width
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("image_size", image_size), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")

    architecture = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "width": width,
        "batch_stats_only": bool(batch_stats_only),
        "pooling": pooling,
    }
    if name == "conv4":
        feature_dim = conv4_feature_dim(width, image_size, pooling)
        backbone = Conv4Backbone(in_channels, width, batch_stats_only, pooling)
    else:
        backbone = ResNetBackbone(BLOCKS_PER_STAGE[name], in_channels, width, batch_stats_only)
        feature_dim = backbone.feature_dim
    return FewShotNet(backbone, feature_dim, num_classes, architecture)
