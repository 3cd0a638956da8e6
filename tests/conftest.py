"""Shared test helpers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see dfml/__init__.py
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared folder (real data such as Omniglot): $DFML_SHARED, else <repo root>/../shared."""
    return Path(os.environ.get("DFML_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture
def single_thread():
    """Tiny-tensor tests run faster on one thread, and do not fight other processes for the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
