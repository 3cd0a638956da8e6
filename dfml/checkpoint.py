"""Resumable checkpoints without pickle: one safetensors file per checkpoint.

A nested state (dicts, lists, numbers, strings, tensors; e.g. model + optimizer state dicts, RNG
states, curriculum counters) is split into its tensors, stored as safetensors entries under their
path (``meta_optimizer/state/0/exp_avg``), and the rest, stored as JSON in the file's metadata.
The file is written to a temporary name and renamed, so a kill never leaves a half-written one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dfml.data.store import atomic_save_tensors

TENSOR_TAG = "__tensor__"
INT_KEY_TAG = "__int_keys__"
FORMAT = "dfml-checkpoint/1"


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR_TAG: path}
    if isinstance(value, dict):
        int_keys = all(isinstance(k, int) for k in value) and bool(value)
        body = {str(k): _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {INT_KEY_TAG: body} if int_keys else body
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return {"__float__": repr(value)}  # JSON has no nan/inf
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if TENSOR_TAG in value:
            return tensors[value[TENSOR_TAG]]
        if INT_KEY_TAG in value:
            return {int(k): _join(v, tensors) for k, v in value[INT_KEY_TAG].items()}
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_checkpoint(path: str | Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    if not tensors:
        tensors["/__empty__"] = torch.zeros(0)
    atomic_save_tensors(tensors, Path(path), metadata={"format": FORMAT, "state": json.dumps(skeleton)})


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not a dfml checkpoint (format {metadata.get('format')!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path}: unreadable checkpoint ({err})") from None
    return _join(json.loads(metadata["state"]), tensors)
