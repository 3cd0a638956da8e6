"""Untrusted pool members (task-distribution corruption, METHODS.md 4.2): how many, what each claims, building them.

A pool gathered from the public can hold models whose cards lie. TACO's attack protocol adds untrusted members
to the N honest ones until they make up ``fraction`` of the final pool: U = ceil(N / (1 - fraction)) - N
(fraction 0.2 of 100 honest members: 25 untrusted, a pool of 125). Untrusted member j takes pool index N + j,
after the honest members, which stay exactly the members of the same scenario without untrusted ones.

Member j's kind is ``kinds[j % len(kinds)]``; it claims the scenario dataset ``datasets[j % len(datasets)]``
and ``classes_per_member`` random meta-train classes of it (as leak-free as honest classes are):

* ``deceptive_label``: trained like an honest member, but really on random meta-train classes of the ``source``
  dataset, none of whose script family is in the meta-test of a scenario dataset (else the lie would teach
  test concepts). Its card claims the in-domain classes and its real held-out accuracy: a plausible card.
* ``deceptive_accuracy``: never trained (its architecture's seeded initialisation); its card claims
  ``claimed_accuracy``.

Nothing about member j depends on the fraction (only on j and the member's seed), so the pools of a sweep over
fractions are nested: a larger fraction adds members and changes none, and results differ only by what was added.

The truth goes in the card's ``truth`` field (absent: honest). :func:`dfml.pool.load_member` strips it, so no
method can read it; the pool summary reads it with :func:`dfml.pool.read_truth`. How many untrusted members a
pool has and their settings are part of the pool plan (dfml/pool.py: :func:`~dfml.pool.untrusted_count`,
:func:`~dfml.pool.untrusted_settings`, re-exported here); this module says what each one claims and really is,
``scripts/pretrain_member.py`` builds them (it alone needs the stores and the pretraining code).
"""

from __future__ import annotations

import torch

from dfml.models import FewShotNet, build_model
from dfml.pool import (  # the counts and settings re-exported: the pool plan (dfml.pool.member_settings) makes them
    MemberSpec,
    assign_classes,
    honest_count,  # noqa: F401
    member_architecture,
    pool_size,  # noqa: F401
    untrusted_count,  # noqa: F401
    untrusted_settings,  # noqa: F401
)
from dfml.seeds import UNTRUSTED_TRUE_CLASSES, derive_seed

KINDS = ("deceptive_label", "deceptive_accuracy")


def claimed_member(settings: dict, candidates: list[str]) -> MemberSpec:
    """What the card of untrusted member ``settings`` claims: random classes (from the member's seed) among
    ``candidates``, the claimed dataset's pool classes as an honest member gets them (leaks left out)."""
    classes = assign_classes(candidates, 0, settings["classes_per_member"], "overlapping", settings["seed"])
    return MemberSpec(settings["scenario"], settings["index"], settings["dataset"], classes, settings["model"],
                      member_architecture(settings), settings["seed"])


def true_member(settings: dict, source_candidates: list[str]) -> MemberSpec:
    """What a deceptive_label member really learns: random classes of its source among ``source_candidates``
    (dfml.leakage.source_pool_classes), drawn apart from the claimed ones."""
    classes = assign_classes(source_candidates, 0, settings["classes_per_member"], "overlapping",
                             derive_seed(settings["seed"], UNTRUSTED_TRUE_CLASSES))
    return MemberSpec(settings["scenario"], settings["index"], settings["untrusted"]["source"], classes,
                      settings["model"], member_architecture(settings), settings["seed"])


def seeded_init(architecture: dict, seed: int) -> FewShotNet:
    """The architecture as built right after seeding torch with ``seed``: a deceptive_accuracy member's weights."""
    torch.manual_seed(seed)
    return build_model(**architecture).eval()


def truth(kind: str, true_heldout_accuracy: float, trained_on: str | None = None,
          true_classes: tuple[str, ...] | None = None) -> dict:
    """The card's ``truth`` field (the card's other fields are the claim)."""
    return {"kind": kind, "trained_on": trained_on, "true_classes": None if true_classes is None else list(true_classes),
            "true_heldout_accuracy": round(true_heldout_accuracy, 6)}
