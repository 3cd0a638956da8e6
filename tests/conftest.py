"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared folder (real data such as Omniglot): $DFML_SHARED, else <repo root>/../shared."""
    return Path(os.environ.get("DFML_SHARED", REPO_ROOT.parent / "shared"))
