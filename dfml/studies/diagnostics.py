"""How far meta-training moved the learnable pseudo dataset from its warm start, and why.

Used to study ECI against plain EI: an adversarial step adds ``-lambda_adv * outer loss`` to the
pseudo data's objective and takes the step with the *same* Adam optimizer as the inversion. A large
adversarial gradient inflates Adam's second moment ``v`` of the pixels it touched; ``v`` decays by
``beta2 = 0.999`` per step, so for hundreds of iterations afterwards the inversion gradient moves those
pixels ``sqrt(v)`` times less, and the first moment keeps carrying them in the adversarial direction.
:func:`pseudo_drift` measures both effects per image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from safetensors.torch import load_file

QUANTILES = (0.5, 0.9, 0.99)


def per_image_quantiles(values: torch.Tensor) -> dict[str, float]:
    """``values`` [images] -> {"q50": ..., "q90": ..., "q99": ...}."""
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"q{round(100 * p)}": float(v) for p, v in zip(QUANTILES, q)}


def pseudo_drift(warm: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-image statistics of two saved pseudo datasets (``PseudoDataset.save`` tensors):

    - ``displacement``: mean absolute pixel change from the warm start;
    - ``adam_rms_ratio``: sqrt(mean Adam ``v``) at the end over the same at the warm start (how much
      smaller the steps of an equal inversion gradient have become).
    """
    if warm["images"].shape != final["images"].shape:
        raise ValueError(f"pseudo datasets differ in shape: {tuple(warm['images'].shape)} vs "
                         f"{tuple(final['images'].shape)}")
    for name, tensors in (("warm start", warm), ("final", final)):
        if "adam.exp_avg_sq" not in tensors:
            raise ValueError(f"the {name} pseudo dataset holds no Adam moments (saved before any step?)")
    images = warm["images"].flatten(0, 1)
    displacement = (final["images"].flatten(0, 1) - images).abs().flatten(1).mean(1)
    rms = [t["adam.exp_avg_sq"].flatten(0, 1).flatten(1).mean(1).sqrt() for t in (warm, final)]
    return {"displacement": per_image_quantiles(displacement),
            "adam_rms_ratio": per_image_quantiles(rms[1] / rms[0].clamp_min(1e-30))}


def curve_bn_and_pushes(curve_path: str | Path) -> dict[str, float]:
    """BN-matching term of the pool at the first and last iteration, and the number of adversarial steps."""
    with open(curve_path) as handle:
        rows = [row for row in csv.DictReader(handle) if row["inversion_bn"]]
    if not rows:
        raise ValueError(f"{curve_path} has no logged iterations")
    return {"bn_first": float(rows[0]["inversion_bn"]), "bn_last": float(rows[-1]["inversion_bn"]),
            "adversarial_steps": sum(int(row["adversarial"]) for row in rows)}


def drift_row(warm_path: str | Path, run_dir: str | Path) -> dict[str, float]:
    """One metatrain run directory (pseudo_final.safetensors + curve.csv) against its warm start."""
    run_dir = Path(run_dir)
    drift = pseudo_drift(load_file(str(warm_path)), load_file(str(run_dir / "pseudo_final.safetensors")))
    row = curve_bn_and_pushes(run_dir / "curve.csv")
    for name, quantiles in drift.items():
        row.update({f"{name}_{q}": value for q, value in quantiles.items()})
    return row
