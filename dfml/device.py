"""Device choice: CUDA when available, else CPU; DFML_DEVICE overrides (e.g. DFML_DEVICE=cpu)."""

from __future__ import annotations

import os

import torch


def pick_device(preference: str | None = None) -> torch.device:
    """The device, with full float32 arithmetic on CUDA (:func:`use_full_float32`)."""
    choice = preference or os.environ.get("DFML_DEVICE", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} requested (DFML_DEVICE) but CUDA is not available here")
        use_full_float32()
    return device


def use_full_float32() -> None:
    """No TF32 on CUDA. cuDNN convolutions use TF32 by default (10-bit mantissa): measured on an H200, a
    20-member pool's inversion gradients then differed from the float32 reference by up to 17% (73% of the
    pixels by more than 1e-5), so GPU results would not be comparable with CPU ones."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def set_threads(threads: int | None) -> None:
    """Match torch's intra-op threads to what the scheduler granted the job."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
