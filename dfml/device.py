"""Device choice: CUDA when available, else CPU; DFML_DEVICE overrides (e.g. DFML_DEVICE=cpu)."""

from __future__ import annotations

import os

import torch


def pick_device(preference: str | None = None) -> torch.device:
    choice = preference or os.environ.get("DFML_DEVICE", "auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested (DFML_DEVICE) but CUDA is not available here")
    return device


def set_threads(threads: int | None) -> None:
    """Match torch's intra-op threads to what the scheduler granted the job."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
