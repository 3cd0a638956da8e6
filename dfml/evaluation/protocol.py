"""Evaluation protocols: how a model is scored on real episodes (METHODS.md 1.4-1.5).

One protocol drives both uses of real episodes: meta-val selection during meta-training and the
meta-test score of the model it selected (params.yaml ``evaluation``). Several protocols (1 and 10
test steps, say) are several selections from the same training run, each tested consistently.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfml.meta import Learner, build_learner


@dataclass(frozen=True)
class Protocol:
    name: str
    test_steps: int  # inner steps on the real support before the queries are scored
    query: int  # real query images per class


def evaluation_protocols(settings: dict) -> list[Protocol]:
    """Every protocol of a phase's settings (their ``evaluation`` section), sorted by name."""
    evaluation = settings["evaluation"]
    return [Protocol(name, spec["test_steps"], evaluation["query"])
            for name, spec in sorted(evaluation["protocols"].items())]


def evaluation_protocol(settings: dict, name: str) -> Protocol:
    by_name = {p.name: p for p in evaluation_protocols(settings)}
    if name not in by_name:
        raise ValueError(f"unknown evaluation protocol {name!r}; defined in evaluation.protocols: {sorted(by_name)}")
    return by_name[name]


def make_learner(metatrain: dict, test_steps: int = 1) -> Learner:
    """The meta-learner of ``metatrain`` settings, adapting ``test_steps`` steps at evaluation."""
    if metatrain["learner"] == "protonet":
        return build_learner("protonet")
    return build_learner(metatrain["learner"], inner_lr=metatrain["inner_lr"], train_steps=metatrain["train_steps"],
                         test_steps=test_steps)
