"""The model pool: which classes and architecture each member gets, its files, and safe loading.

A member is written as ``member_<i>.safetensors`` (weights) plus ``member_<i>.json`` (its card:
classes in head order, architecture, dataset, input format, held-out accuracy, seed, training
settings, weights checksum; an untrusted member's card also holds the ``truth``, dfml/untrusted.py).
Loading validates every card against its weights, never unpickles anything and hides the truth. The pool
plan (:func:`member_settings`) covers the untrusted members too: how many (:func:`untrusted_count`) and their
settings (:func:`untrusted_settings`); what they claim and really are is dfml/untrusted.py's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from dfml.data.store import DatasetStore, atomic_save_tensors, atomic_write_text
from dfml.models import FewShotNet
from dfml.models.card import (
    ModelFileError,
    build_from_card,
    load_checked_state,
    read_card,
    read_weights,
    require_weights_file,
)
from dfml.seeds import derive_seed

CARD_FORMAT = "dfml-pool-member/1"
TRUTH_KEY = "truth"  # an untrusted member's real kind, data and accuracy: never shown to a method
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


# Pool members are model files: their errors (missing, corrupt, pickled, disagreeing with the card) are
# dfml.models.card's.
PoolError = ModelFileError


@dataclass(frozen=True)
class MemberSpec:
    """What member ``index`` of a scenario is: its data, its classes (in head order), its architecture."""

    scenario: str
    index: int
    dataset: str
    classes: tuple[str, ...]
    model: str
    architecture: dict
    seed: int


MIN_MEMBER_CLASSES = 2


def assign_classes(train_classes: list[str], member: int, count: int, how: str, seed: int) -> tuple[str, ...]:
    """Classes of the ``member``-th member of one dataset.

    disjoint: the member-th contiguous block of sorted meta-train classes (PURER). As in PURER, the last
    block may be shorter (CIFAR-FS: 64 classes make 12 blocks of 5 and one of 4), but not below
    ``MIN_MEMBER_CLASSES``: a one-class member (PURER's last Flowers model) teaches nothing;
    overlapping: ``count`` random classes, kept in draw order as the head order (PURER-Plus).
    """
    ordered = sorted(train_classes)
    if how == "disjoint":
        block = ordered[member * count:(member + 1) * count]
        if len(block) < min(count, MIN_MEMBER_CLASSES):
            most = -(-len(ordered) // count) - (0 < len(ordered) % count < MIN_MEMBER_CLASSES)
            raise ValueError(f"disjoint assignment: member {member} would get {len(block)} of classes "
                             f"{member * count}..{(member + 1) * count - 1}, the dataset has {len(ordered)} meta-train "
                             f"classes; lower members_per_dataset to at most {most} or use class_assignment: overlapping")
        return tuple(block)
    if how == "overlapping":
        if count > len(ordered):
            raise ValueError(f"overlapping assignment needs {count} classes, the dataset has {len(ordered)}")
        picked = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
        return tuple(ordered[i] for i in picked)
    raise ValueError(f"unknown class_assignment {how!r}; expected 'disjoint' or 'overlapping'")


def untrusted_count(honest: int, fraction: float) -> int:
    """U = ceil(honest / (1 - fraction)) - honest, on the fraction as written (0.8 is 4/5, not 0.8000000000000000444):
    in floats 6 / (1 - 0.8) is 30.000000000000004 and would add a member."""
    exact = Fraction(str(fraction))
    return math.ceil(Fraction(honest) / (1 - exact)) - honest


def honest_count(scenario: dict) -> int:
    return scenario["members_per_dataset"] * len(scenario["datasets"])


def pool_size(scenario: dict) -> int:
    """Honest plus untrusted members of a scenario."""
    honest = honest_count(scenario)
    untrusted = scenario.get("untrusted")
    return honest + (untrusted_count(honest, untrusted["fraction"]) if untrusted else 0)


def untrusted_settings(shared: dict, scenario: dict, position: int) -> dict:
    """The settings of untrusted member ``position`` (pool index honest + position), given ``shared``, what every
    member of the scenario gets (dfml.pool.member_settings). Carries nothing that depends on the fraction, and
    only what its kind uses (a deceptive_accuracy member is not trained: only the held-out share matters)."""
    config = scenario["untrusted"]
    kind = config["kinds"][position % len(config["kinds"])]
    if kind == "deceptive_label":
        lie, pretrain = {"kind": kind, "source": config["source"]}, shared["pretrain"]
    else:
        lie = {"kind": kind, "claimed_accuracy": config["claimed_accuracy"]}
        pretrain = {"heldout_fraction": shared["pretrain"]["heldout_fraction"]}
    datasets = scenario["datasets"]
    return {**shared, "dataset": datasets[position % len(datasets)], "pretrain": pretrain, "untrusted": lie}


def member_settings(params: dict, scenario_name: str, index: int) -> dict:
    """Everything that determines member ``index`` of a scenario, and nothing else.

    Datasets take consecutive ranges of the honest members; untrusted members (scenario key ``untrusted``)
    follow them (dfml/untrusted.py); architectures cycle over all members. Snakemake passes this dict to the
    job (so a params change reruns exactly the members it affects).
    """
    scenario = params["scenarios"][scenario_name]
    per_dataset = scenario["members_per_dataset"]
    total = pool_size(scenario)
    if not 0 <= index < total:
        raise ValueError(f"scenario {scenario_name} has members 0..{total - 1}, got {index}")
    model_name = scenario["architectures"][index % len(scenario["architectures"])]
    model_cfg = params["models"][model_name]
    family = "conv4" if model_cfg["arch"] == "conv4" else "resnet"
    pretrain = {k: v for k, v in params["pretrain"].items() if k not in ("conv4", "resnet")}
    shared = {
        "scenario": scenario_name,
        "index": index,
        "scenario_datasets": list(scenario["datasets"]),  # their meta-test decides which classes leak
        "cross_dataset_leaks": scenario["cross_dataset_leaks"],
        "classes_per_member": scenario["classes_per_member"],
        "model": model_name,
        "arch": model_cfg["arch"],
        "width": model_cfg.get("width"),
        "image_size": scenario["image_size"],
        "channels": scenario["channels"],
        "seed": derive_seed(params["seed"], index),
        "pretrain": {**pretrain, "optimizer": params["pretrain"][family]},
    }
    honest = honest_count(scenario)
    if index >= honest:
        return untrusted_settings(shared, scenario, index - honest)
    return {**shared, "dataset": scenario["datasets"][index // per_dataset], "dataset_member": index % per_dataset,
            "class_assignment": scenario["class_assignment"]}


def plan_member(settings: dict, train_classes: list[str]) -> MemberSpec:
    """The member described by :func:`member_settings`, given the meta-train classes of its dataset that
    members may be assigned (all of them, or those left after ``dfml.leakage.pool_classes``)."""
    classes = assign_classes(train_classes, settings["dataset_member"], settings["classes_per_member"],
                             settings["class_assignment"], settings["seed"])
    return MemberSpec(settings["scenario"], settings["index"], settings["dataset"], classes, settings["model"],
                      member_architecture(settings), settings["seed"])


def member_architecture(settings: dict) -> dict:
    """The architecture of the member described by :func:`member_settings`."""
    # The head is classes_per_member wide even for a shorter last block (PURER): one shape for the whole
    # pool, so a conv4 pool stays averageable; the unused logits are only ever pushed down in training.
    return {"name": settings["arch"], "num_classes": settings["classes_per_member"], "in_channels": settings["channels"],
            "image_size": settings["image_size"], "width": settings["width"],
            "batch_stats_only": False, "pooling": "flatten"}


def dataset_card_fields(store: DatasetStore, classes: tuple[str, ...]) -> dict:
    """What a card says about its dataset: the classes' meta-train indices and the input normalisation."""
    return {"class_indices": [store.classes("meta_train").index(c) for c in classes],
            "normalization": {"mean": list(store.info.mean), "std": list(store.info.std)}}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def member_paths(pool_dir: str | Path, index: int) -> tuple[Path, Path]:
    pool_dir = Path(pool_dir)
    return pool_dir / f"member_{index}.safetensors", pool_dir / f"member_{index}.json"


def save_member(model: FewShotNet, spec: MemberSpec, weights_path: str | Path, card_path: str | Path,
                **card_fields) -> dict:
    """Write weights (safetensors) then the card that points at them, both atomically."""
    weights_path, card_path = Path(weights_path), Path(card_path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save_tensors(state, weights_path, metadata={"format": CARD_FORMAT})
    card = {
        "format": CARD_FORMAT,
        **asdict(spec),
        "classes": list(spec.classes),
        "architecture": model.config(),
        "weights_file": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        **card_fields,
    }
    atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    return card


@dataclass
class PoolMember:
    model: FewShotNet
    card: dict

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def qualified_classes(self) -> list[str]:
        """Class names prefixed by their dataset, unique across a multi-dataset pool."""
        return [f"{self.card['dataset']}/{name}" for name in self.card["classes"]]


def _refuse_pickles(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise PoolError(f"{path}: refusing to load a pickled model file; pool weights must be .safetensors")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        return
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
        raise PoolError(f"{path}: looks like a pickle/torch.save archive; refusing to unpickle, "
                        "convert it to safetensors first")


def load_member(card_path: str | Path, device: torch.device | str = "cpu") -> PoolMember:
    """Load one member, checking the card against the weights. Errors name the file and the mismatch."""
    card_path = Path(card_path)
    card = read_card(card_path, ("architecture", "classes", "weights_file"), CARD_FORMAT)
    weights_path = card_path.parent / card["weights_file"]
    require_weights_file(weights_path, card_path)
    _refuse_pickles(weights_path)
    if "weights_sha256" in card and sha256_file(weights_path) != card["weights_sha256"]:
        raise PoolError(f"{weights_path}: checksum differs from the card {card_path.name} (corrupt or replaced file)")
    state = read_weights(weights_path)
    model = build_from_card(card, card_path)
    if model.num_classes < len(card["classes"]):
        raise PoolError(f"{card_path}: head has {model.num_classes} outputs but the card lists "
                        f"{len(card['classes'])} classes")
    load_checked_state(model, state, weights_path, card_path)
    visible = {key: value for key, value in card.items() if key != TRUTH_KEY}
    return PoolMember(model.to(device).eval(), visible)


def read_truth(card_path: str | Path) -> dict | None:
    """What an untrusted member really is (dfml/untrusted.py), None for an honest member. For reports only:
    :func:`load_member` hides it from methods."""
    return read_card(Path(card_path), (), CARD_FORMAT).get(TRUTH_KEY)


def load_pool(pool_dir: str | Path, device: torch.device | str = "cpu") -> list[PoolMember]:
    """All members of a pool directory, in member-index order."""
    pool_dir = Path(pool_dir)
    cards = sorted(pool_dir.glob("member_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not cards:
        raise PoolError(f"{pool_dir}: no member_<i>.json cards found (build the pool with "
                        f"`snakemake --cores 2 pool`)")
    return [load_member(card, device) for card in cards]
