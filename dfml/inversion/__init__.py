"""Model inversion for data-free meta-learning: loss terms, pseudo dataset, pool engine."""

from dfml.inversion.batched import architecture_key
from dfml.inversion.engine import InversionEngine
from dfml.inversion.losses import (
    BNStatisticsRecorder,
    InversionWeights,
    bn_layer_term,
    bn_statistics_loss,
    jitter,
    l2_prior,
    total_variation,
)
from dfml.inversion.pseudo_data import PseudoDataset, gather_member_view

__all__ = [
    "BNStatisticsRecorder",
    "InversionEngine",
    "InversionWeights",
    "PseudoDataset",
    "architecture_key",
    "bn_layer_term",
    "bn_statistics_loss",
    "gather_member_view",
    "jitter",
    "l2_prior",
    "total_variation",
]
