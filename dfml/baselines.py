"""The meta-test baselines by name, and the registry of parameter fusions: names only, no torch.

A baseline is an untrained meta-model scored like a trained one: ``random`` (a seeded initialisation) or a
fusion of the pool's weights (``average``, ``ota``), optionally followed by ``_<learner>`` to be scored with
another learner than meta-training's (``average_protonet``). The fusion code lives in ``dfml/models/`` and
is imported only where a fusion is asked for (:mod:`dfml.models.fusion`), so that the config layer, which
parses baseline names, and every job that fuses nothing run without it (dfml/codedeps.py reads
:data:`FUSIONS` to give each job only the fusion it uses).
"""

from __future__ import annotations

# fusion name -> (module, function of a list of state dicts); imported on demand
FUSIONS: dict[str, tuple[str, str]] = {
    "average": ("dfml.models.averaging", "average_state_dicts"),
    "ota": ("dfml.models.ota", "ota_fuse"),
}
AUTO_FUSION = "average"  # what metatrain.init ``auto`` fuses when the pool can be fused
BASELINE_INITS = ("random", *FUSIONS)
LEARNERS = ("maml", "fomaml", "anil", "protonet")


def baseline_parts(name: str) -> tuple[str, str | None]:
    """A baseline's meta-model and the learner it is scored with: ``average`` -> (average, None: metatrain's
    learner), ``average_protonet`` -> (average, protonet), so a method meta-tested with its own learner (TACO:
    ProtoNet) has a baseline scored the same way."""
    init, _, learner = name.partition("_")
    if init not in BASELINE_INITS or (learner and learner not in LEARNERS):
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(BASELINE_INITS)}, optionally "
                         f"followed by _<learner> ({', '.join(LEARNERS)}), e.g. average_protonet")
    return init, learner or None


def baseline_method(name: str) -> dict:
    """A baseline as a method entry for dfml.config.method_metatrain: its learner when it names one."""
    learner = baseline_parts(name)[1]
    return {"learner": learner} if learner else {}
