"""Model inversion for data-free meta-learning: loss terms, pseudo dataset, pool engine.

The package's names are imported on first use (PEP 562), each from its own module: ``from dfml.inversion
import PseudoDataset`` loads the pseudo dataset, not the pool engine and its CPU kernels (dfml/inversion/
fused*.py), so a job that only reads pseudo data or uses the loss terms (a meta-test's ICFIL) neither loads
nor depends on them (dfml/codedeps.py reads :data:`EXPORTS`).
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
EXPORTS: dict[str, str] = {
    "BNStatisticsRecorder": "dfml.inversion.losses",
    "InversionEngine": "dfml.inversion.engine",
    "InversionWeights": "dfml.inversion.losses",
    "PseudoDataset": "dfml.inversion.pseudo_data",
    "architecture_key": "dfml.inversion.batched",
    "bn_layer_term": "dfml.inversion.losses",
    "bn_statistics_loss": "dfml.inversion.losses",
    "gather_member_view": "dfml.inversion.pseudo_data",
    "jitter": "dfml.inversion.losses",
    "l2_prior": "dfml.inversion.losses",
    "total_variation": "dfml.inversion.losses",
}

__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
