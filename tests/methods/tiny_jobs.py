"""Tiny meta-training jobs shared by the method tests: a synthetic white-box pool of three Conv4 members and a
job for any registered algorithm (params.yaml's settings shrunk, the algorithm's schema defaults)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from conftest import params_for_own_methods
from dfml.inversion import PseudoDataset
from dfml.methods.base import MethodInputs, method_class
from dfml.models import build_model
from dfml.models.access import BlackBoxAPI
from dfml.models.fusion import build_meta_model

WAY, SHOT, QUERY, SIZE = 3, 1, 2, 16


def make_pool():
    torch.manual_seed(0)
    members = []
    for m in range(3):
        model = build_model("conv4", 3, 1, SIZE, width=4)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
        members.append(SimpleNamespace(model=model.eval(), qualified_classes=[f"c{m * 3 + k}" for k in range(3)],
                                       classes=[f"c{m * 3 + k}" for k in range(3)], card={"dataset": "toy"}))
    return members


# Each algorithm's settings shrunk to a few seconds (the others keep params.yaml's / the schema's).
TINY = {"bidfmkd": {"q": 4, "recovery_steps": 2, "support_per_class": 3, "query_per_class": 3, "latent_dim": 8,
                    "generator_width": 4, "kd_steps": 2, "generate_interval": 1, "boundary_start": 2,
                    "memory_batches": 2},
        "taco": {"recovery_steps": 2, "latent_dim": 8, "generator_width": 4, "query_per_class": 3,
                 "generate_interval": 1, "memory_batches": 2},
        "tgr": {"recovery_steps": 2, "latent_dim": 8, "generator_width": 4, "support_per_class": 2,
                "query_per_class": 3, "teachers": 2, "groups": 2, "embedding_batches": 1, "embedding_per_class": 2,
                "generate_interval": 1, "memory_batches": 2},
        "free": {"teachers": 2, "per_class": 3, "adaptation_steps": 2, "latent_dim": 8, "generator_width": 4,
                 "warmup_events": 1, "generate_interval": 1, "memory_batches": 2}}
LEARNER = {"taco": "protonet"}  # interpolation mixes features: TACO's default learner


def contract_inputs(algorithm: str, seed: int = 0) -> MethodInputs:
    """A tiny job for any algorithm: params.yaml's settings shrunk, the algorithm's schema defaults, a synthetic
    white-box conv4 pool, pseudo data when the algorithm needs it."""
    from dfml.config import check_params
    from dfml.evaluation.protocol import make_learner

    params = {**params_for_own_methods(), "methods": {"m": {"algorithm": algorithm}}}
    params = check_params(params)
    metatrain = {**params["metatrain"], "way": WAY, "query": QUERY, "meta_batch": 2, "inner_lr": 0.1,
                 "learner": LEARNER.get(algorithm, params["metatrain"]["learner"])}
    settings = {"seed": 0, "inversion": {**params["inversion"], "engine": "sequential"}, "metatrain": metatrain,
                "evaluation": params["evaluation"], "method": params["methods"]["m"]}
    settings["method"].update(TINY.get(algorithm, {}))
    settings["scenario"] = {"channels": 1, "image_size": SIZE}
    cls = method_class(algorithm)
    pool = make_pool()
    pseudo = (PseudoDataset.for_pool([m.qualified_classes for m in pool], (1, SIZE, SIZE), shots=SHOT,
                                     queries=QUERY, seed=seed) if cls.needs_pseudo_data else None)
    black_box = cls.access == "black_box"
    model = build_meta_model([m.model for m in pool], "random" if black_box else "average", way=WAY, in_channels=1,
                             image_size=SIZE, width=4)
    apis = [BlackBoxAPI.from_model(m.model, m.qualified_classes, "toy") for m in pool] if black_box else None
    stores = {"toy": SimpleNamespace(info=SimpleNamespace(mean=(0.5,), std=(0.25,)))}
    return MethodInputs(settings, SHOT, None if black_box else pool, pseudo, model, make_learner(metatrain), "cpu",
                        seed=seed, apis=apis, stores=stores)
