"""A model on disk: a JSON card (format, architecture, ...) next to its safetensors weights.

Used for pool members (``dfml.pool``) and meta-trained models (``<protocol>/meta_model.json`` +
``meta_model.safetensors``). Nothing is unpickled; every error names the file it is about.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dfml.models.base import FewShotNet
from dfml.models.registry import build_model

META_MODEL_FORMAT = "dfml-meta-model/1"


class ModelFileError(ValueError):
    """A model card or its weights file is missing, unreadable, or the two disagree."""


def read_card(card_path: Path, required: Sequence[str], card_format: str) -> dict:
    """The card at ``card_path``, holding every key of ``required`` and written in ``card_format``."""
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{card_path}: unreadable card ({err})") from None
    for key in ("format", *required):
        if key not in card:
            raise ModelFileError(f"{card_path}: card lacks {key!r}")
    if card["format"] != card_format:
        raise ModelFileError(f"{card_path}: unknown card format {card['format']!r}, expected {card_format}")
    return card


def require_weights_file(weights_path: Path, card_path: Path) -> None:
    if not weights_path.is_file():
        raise ModelFileError(f"{card_path}: weights file {weights_path} is missing")


def read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{weights_path}: not a readable safetensors file ({err})") from None


def build_from_card(card: dict, card_path: Path) -> FewShotNet:
    """A freshly initialised model of the card's architecture."""
    try:
        return build_model(**card["architecture"])
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{card_path}: invalid architecture {card['architecture']} ({err})") from None


def load_checked_state(model: FewShotNet, state: dict, weights_path: Path, card_path: Path) -> None:
    """Load ``state`` into ``model`` after checking that its names and shapes are the model's."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{weights_path}: does not match the architecture in {card_path.name}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, the card's "
                                 f"architecture ({card_path.name}) needs {tuple(tensor.shape)}")
    model.load_state_dict(state)


def load_meta_model(weights_path: str | Path, device: torch.device | str = "cpu") -> FewShotNet:
    """A meta-trained model from ``meta_model.safetensors`` and the card beside it (``meta_model.json``)."""
    weights_path = Path(weights_path)
    card_path = weights_path.with_suffix(".json")
    card = read_card(card_path, ("architecture",), META_MODEL_FORMAT)
    require_weights_file(weights_path, card_path)
    model = build_from_card(card, card_path)
    load_checked_state(model, read_weights(weights_path), weights_path, card_path)
    return model.to(device)
