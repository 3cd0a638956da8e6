"""Concept leaks across the datasets of one scenario, and keeping them out of the pool.

A scenario that mixes datasets (MH) meta-tests on every dataset's meta-test classes. A pool member of
dataset A trained on classes whose script family (``dfml.data.families``) is also among dataset B's
meta-test classes has seen B's test concepts (Cyrillic glyphs teaching what Omniglot's Old Church
Slavonic test alphabet looks like), and the few-shot numbers on B would reward that silently.

The pool classes of a dataset are its meta-train classes, the candidates members are assigned from.
Leaks are counted against the other datasets' meta-test classes only (``EVALUATED_SPLITS``): meta-val
chooses checkpoints and calibration, so a leak there makes the selection optimistic but cannot raise
a reported number. The scenario key ``cross_dataset_leaks`` decides: ``refuse`` (default) stops with
the leaking classes named, ``exclude`` leaves them out of the candidates before members are assigned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfml.data.families import family_of
from dfml.data.store import DatasetStore

LEAK_POLICIES = ("refuse", "exclude")
EVALUATED_SPLITS = ("meta_test",)
EXAMPLES_SHOWN = 5


class CrossDatasetLeakError(ValueError):
    """Pool classes of one dataset share a script family with another dataset's meta-test classes."""


@dataclass(frozen=True)
class LeakedClass:
    """A pool class of ``dataset`` whose ``family`` is in the meta-test of each of ``tested_in``."""

    dataset: str
    class_name: str
    group: str
    family: str
    tested_in: tuple[str, ...]

    def reason(self) -> str:
        return f"family {self.family} is in the meta-test of {', '.join(self.tested_in)}"

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "class": self.class_name, "group": self.group, "family": self.family,
                "tested_in": list(self.tested_in), "reason": self.reason()}


def evaluated_families(store: DatasetStore) -> set[str]:
    """Script families of the classes a dataset is meta-tested on."""
    groups = store.groups()
    return {family_of(groups[name]) for split in EVALUATED_SPLITS for name in store.classes(split)}


def find_leaks(stores: dict[str, DatasetStore]) -> list[LeakedClass]:
    """Every pool class of every dataset whose family another dataset is meta-tested on."""
    if len(stores) < 2:
        return []
    tested = {name: evaluated_families(store) for name, store in stores.items()}
    leaks = []
    for name, store in stores.items():
        groups = store.groups()
        for class_name in store.classes("meta_train"):
            family = family_of(groups[class_name])
            tested_in = tuple(other for other in stores if other != name and family in tested[other])
            if tested_in:
                leaks.append(LeakedClass(name, class_name, groups[class_name], family, tested_in))
    return leaks


def by_dataset_and_family(leaks: list[LeakedClass]) -> dict[tuple[str, str], list[LeakedClass]]:
    grouped: dict[tuple[str, str], list[LeakedClass]] = {}
    for leak in leaks:
        grouped.setdefault((leak.dataset, leak.family), []).append(leak)
    return grouped


def refusal_message(scenario: str, leaks: list[LeakedClass]) -> str:
    lines = [f"scenario {scenario}: pool classes share a script family with another dataset's meta-test "
             f"(a concept leak across datasets):"]
    for (dataset, family), found in by_dataset_and_family(leaks).items():
        names = [leak.class_name for leak in found]
        shown = ", ".join(names[:EXAMPLES_SHOWN]) + (", ..." if len(names) > EXAMPLES_SHOWN else "")
        counted = f"{len(names)} meta-train class{'es' if len(names) > 1 else ''}"
        lines.append(f"  - {dataset}: {counted} of family {family} ({shown}); {found[0].reason()}")
    lines.append(f"Set scenarios.{scenario}.cross_dataset_leaks: exclude to leave these classes out of the pool "
                 f"(the pool summary lists them), or mix datasets that share no script family.")
    return "\n".join(lines)


def pool_classes(scenario: str, dataset: str, stores: dict[str, DatasetStore],
                 policy: str = "refuse") -> tuple[list[str], list[LeakedClass]]:
    """The meta-train classes of ``dataset`` that members may be assigned, and those left out as leaks."""
    if policy not in LEAK_POLICIES:
        raise ValueError(f"unknown cross_dataset_leaks {policy!r}; expected one of {', '.join(LEAK_POLICIES)}")
    leaks = find_leaks(stores)
    if leaks and policy == "refuse":
        raise CrossDatasetLeakError(refusal_message(scenario, leaks))
    excluded = [leak for leak in leaks if leak.dataset == dataset]
    dropped = {leak.class_name for leak in excluded}
    return [name for name in stores[dataset].classes("meta_train") if name not in dropped], excluded


def member_pool_classes(settings: dict, data_root: str | Path = "data") -> tuple[list[str], list[LeakedClass]]:
    """:func:`pool_classes` for the member described by ``dfml.pool.member_settings``."""
    stores = {name: DatasetStore(Path(data_root) / name) for name in settings["scenario_datasets"]}
    return pool_classes(settings["scenario"], settings["dataset"], stores, settings["cross_dataset_leaks"])


def source_pool_classes(settings: dict, data_root: str | Path = "data") -> tuple[list[str], list[LeakedClass]]:
    """The meta-train classes of an untrusted member's source dataset (dfml/untrusted.py) whose script family no
    dataset of its scenario is meta-tested on, and those left out: the source counts as one more dataset whose
    pool classes may leak, always excluded (the member is built to lie about its classes, not to teach test ones)."""
    source = settings["untrusted"]["source"]
    stores = {name: DatasetStore(Path(data_root) / name) for name in [source, *settings["scenario_datasets"]]}
    leaks = [leak for leak in find_leaks(stores) if leak.dataset == source]
    dropped = {leak.class_name for leak in leaks}
    return [name for name in stores[source].classes("meta_train") if name not in dropped], leaks
