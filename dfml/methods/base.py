"""The interface every meta-training method implements, and the registry of algorithms.

A method (PURER, BiDf-MKD, TACO, FREE, TGR) is one module of ``dfml/methods/`` with one
:class:`MetaTrainingMethod` subclass: a file (``purer.py``), or a package whose ``__init__.py`` holds the method
and whose other modules hold the helpers no other method uses (``tgr/``: its Fisher embedding, grouping and
regulariser). What several methods share stays in ``dfml/meta/``, ``dfml/inversion/`` and
:mod:`dfml.methods.generative`. A method declares what it needs (``needs_pseudo_data``: the warm-start
pseudo dataset of ``invert_pool``; ``access``: white-box members or black-box query functions), is built
from a :class:`MethodInputs`, and supplies one training step and its own state. Everything around it (the
loop with meta-val selection, checkpoints and exact resume, NaN stops, SIGTERM, progress, curves) is
shared: :mod:`dfml.methods.loop` and :mod:`dfml.metatrain`.

``params.yaml`` names each method's ``algorithm`` (a key of :data:`ALGORITHMS`) next to that algorithm's
settings; the schema checks the settings per algorithm (its block ``definitions.algorithms.<name>``).
docs/adding_a_method.md walks through adding one.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

# algorithm name -> (module, class); imported on demand (dfml/codedeps.py reads the module names)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "purer": ("dfml.methods.purer", "PurerMethod"),
    "bidfmkd": ("dfml.methods.bidfmkd", "BidfmkdMethod"),
    "taco": ("dfml.methods.taco", "TacoMethod"),
    "tgr": ("dfml.methods.tgr", "TgrMethod"),
    "free": ("dfml.methods.free", "FreeMethod"),
}


class NonFiniteLoss(FloatingPointError):
    """A loss went nan or inf: the run stops, naming the iteration and the term."""


def check_finite(value: torch.Tensor | float, iteration: int, term: str) -> None:
    value = torch.as_tensor(value).detach()
    if not bool(torch.isfinite(value).all()):
        kind = "nan" if bool(torch.isnan(value).any()) else "inf"
        raise NonFiniteLoss(f"loss is {kind} at meta-iteration {iteration} (term {term})")


@dataclass
class EpisodeSettings:
    """The episodes every method meta-trains on: ``metatrain``'s way, query, meta-batch and outer lr, and the
    job's shot. A method's settings dataclass extends it with its own."""

    way: int = 5
    shot: int = 1
    query: int = 15
    meta_batch: int = 4
    outer_lr: float = 1e-3

    @staticmethod
    def from_metatrain(metatrain: dict, shot: int) -> dict:
        return {"way": metatrain["way"], "shot": shot, "query": metatrain["query"],
                "meta_batch": metatrain["meta_batch"], "outer_lr": metatrain["outer_lr"]}

    @classmethod
    def from_job(cls, settings: dict, shot: int):
        """The episodes from ``metatrain`` and the job's shot, the method's own fields from its params.yaml entry
        (absent ones keep their defaults)."""
        episode = cls.from_metatrain(settings["metatrain"], shot)
        own = {f.name: settings["method"][f.name] for f in fields(cls)
               if f.name in settings["method"] and f.name not in episode}
        return cls(**episode, **own)


@dataclass
class StepLog:
    """One meta-iteration: the meta-batch loss and accuracy, the wall time, and the method's own curve
    columns (``values``, keyed by the method's ``curve_fields``; bools are written as 0/1, nan as empty)."""

    iteration: int
    meta_loss: float
    meta_accuracy: float
    seconds: float
    values: dict[str, float | bool] = field(default_factory=dict)


@dataclass
class MethodInputs:
    """What a method is built from.

    ``settings``: the job's settings ({seed, scenario, inversion, metatrain, evaluation, method}; ``method``
    is this method's params.yaml entry); ``pool``: the scenario's members (dfml.pool.PoolMember) for a
    white-box method, None for a black-box one; ``apis``: the members as counted query functions
    (dfml.models.access.BlackBoxAPI) for a black-box method, else None; ``pseudo``: the warm-start pseudo
    dataset when the method needs it, else None; ``meta_model``: the initialised meta-model, on ``device``;
    ``learner``: the meta-learner (MAML / ANIL / ProtoNet) of ``metatrain.learner``; ``seed``: the method's
    own seed (its random draws start from it); ``stores``: the scenario's datasets (name -> DatasetStore:
    class lists, normalisation), never their meta-train images for a data-free method; ``val_sets``: real
    meta-val episodes (dfml.evaluation.episodes.EpisodeSet per dataset), handed over only to a method whose settings
    declare that it reads them during training (:meth:`MetaTrainingMethod.reads_metaval`: not data-free)."""

    settings: dict
    shot: int
    pool: list
    pseudo: Any
    meta_model: torch.nn.Module
    learner: Any
    device: torch.device | str
    seed: int
    apis: list | None = None
    stores: dict | None = None
    val_sets: list | None = None


class MetaTrainingMethod(ABC):
    """One meta-training algorithm behind the shared loop.

    Class attributes: ``algorithm`` (its params.yaml name), ``needs_pseudo_data`` (the metatrain job gets
    the invert_pool pseudo dataset as input), ``access`` ("white_box": weights, BN statistics, gradients;
    "black_box": logits only), ``curve_fields`` (its columns of curve.csv, after meta_loss, meta_accuracy).
    An instance holds ``iteration`` (meta-iterations done) and ``meta_model``; the loop evaluates and saves
    ``params`` (the meta-model's parameters, trained in place)."""

    algorithm: ClassVar[str]
    needs_pseudo_data: ClassVar[bool]
    access: ClassVar[str]
    curve_fields: ClassVar[tuple[str, ...]] = ()

    iteration: int
    meta_model: torch.nn.Module

    @classmethod
    @abstractmethod
    def build(cls, inputs: MethodInputs) -> MetaTrainingMethod:
        """The method ready to train from iteration 0."""

    @abstractmethod
    def step(self) -> StepLog:
        """One meta-iteration (``iteration`` += 1); raises :class:`NonFiniteLoss` when a loss diverges."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (tensors, numbers, strings; no pickle)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output into a freshly built method."""

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The meta-model parameters the learners adapt at evaluation."""
        return dict(self.meta_model.named_parameters())

    @classmethod
    def reads_metaval(cls, method_settings: dict) -> bool:
        """Whether these settings read real meta-val episodes during training (TACO's published reward and
        trigger): the run is then not data-free, and its cards and report say so."""
        return False

    def describe(self) -> str:
        """One line for the log (settings that matter)."""
        return self.algorithm

    def write_outputs(self, out: Path) -> None:
        """Artifacts besides the meta-models and the curve, written once training ends (default: none)."""

    def card_fields(self) -> dict:
        """What the meta-model cards add about the run (a black-box method: its API budget used)."""
        return {}


def method_class(algorithm: str) -> type[MetaTrainingMethod]:
    """The class of a registered algorithm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown meta-training algorithm {algorithm!r}; known: {', '.join(sorted(ALGORITHMS))}")
    module, name = ALGORITHMS[algorithm]
    return getattr(importlib.import_module(module), name)


def curve_value(value: float | bool, digits: int = 6) -> int | float | str:
    """A curve cell: bools as 0/1, nan as empty, floats rounded."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return round(value, digits)
