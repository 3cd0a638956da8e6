"""Where a run's per-seed artifacts live: the one place that spells the training-seed level of results/.

Trained methods, their warm start and the baselines drawn at random have one folder per training seed,
``seed<t>``; a fusion of the pool (``average``, ``ota``), which no training seed touches, has ``pool``:

    results/synthetic/<scenario>/seed<t>/pseudo.safetensors
    results/metatrain/<scenario>/<method>/seed<t>/shot<k>/{curve.csv, members.json, <protocol>/meta_model.*}
    results/metatest/<scenario>/<method>/<seed<t>|pool>/<protocol>/shot<k>_<calibration>.json
"""

from __future__ import annotations

import re
from pathlib import Path

POOL_RUN = "pool"
_SEED = re.compile(r"seed(\d+)")


def run_dir(training_seed: int | None) -> str:
    """``seed<t>``, or ``pool`` for what no training seed touches."""
    return POOL_RUN if training_seed is None else f"seed{training_seed}"


def run_seed(name: str) -> int | None:
    """The training seed of a ``seed<t>`` folder; None for ``pool``."""
    if name == POOL_RUN:
        return None
    match = _SEED.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a training-seed folder (seed<t> or {POOL_RUN})")
    return int(match.group(1))


def metatrain_run(path: str | Path) -> dict:
    """{scenario, method, training_seed, shot} of a file directly under
    results/metatrain/<scenario>/<method>/seed<t>/shot<k>/ (curve.csv, members.json, pseudo_final...)."""
    parts = Path(path).parts
    if len(parts) < 5 or not parts[-2].startswith("shot"):
        raise ValueError(f"{path}: expected results/metatrain/<scenario>/<method>/seed<t>/shot<k>/<file>")
    return {"scenario": parts[-5], "method": parts[-4], "training_seed": run_seed(parts[-3]),
            "shot": int(parts[-2].removeprefix("shot"))}
