"""Every seed of the pipeline: how one is derived, and the named streams the phases draw from.

A run has one root seed (params.yaml ``seed``). Each random draw of a phase takes its own stream: the seed
``derive_seed(seed, STREAM, ...)``, so draws never share random numbers by accident, and two draws share a
stream only on purpose (said below). Draws that belong to one training run (params ``training_seeds``: the warm
start, the meta-model's initialisation, the method's own draws) go through :func:`training_draw`; draws that
every training seed shares (the pool, the episodes, ICFIL's inversions) use :func:`derive_seed` directly.

Below the streams: member ``i`` of the pool is seeded ``derive_seed(seed, i)`` (dfml/pool.py), and a
member's own draws derive from that member seed (:data:`UNTRUSTED_TRUE_CLASSES`); the episodes of dataset
``d`` of a scenario derive from their stream as ``derive_seed(stream_seed, d)`` (dfml/evaluation/episodes.py).
The values are fixed: changing one changes every result drawn from it.
"""

from __future__ import annotations

import numpy as np

# -- warm start (scripts/invert_pool.py), per training seed
WARM_START_IMAGES = 101  # the pseudo images' initial noise
WARM_START_JITTER = 102  # the inversion engine's random jitter and flips during the warm start

# -- meta-training (dfml/metatrain.py), per training seed
META_MODEL_INIT = 201  # the meta-model's initialisation; a baseline built for meta-test (random, average, ota)
#                        draws the same, so a baseline is the start a trained method began from
METHOD_DRAWS = 202  # the method's own draws (tasks, pseudo batches, generators), with the shot: (202, shot)

# -- real episodes, shared by every training seed and method (paired comparisons)
META_VAL_EPISODES = 301  # meta-val selection of each protocol's model during meta-training; metatest.py
#                          --split meta_val scores the same episodes on purpose (the score the selection saw)
META_TEST_EPISODES = 302  # the meta-test episodes every method is scored on
TUNING_EPISODES = 303  # meta-val episodes on which ICFIL and the steps control are tuned (not the selection's)
TRAINING_META_VAL_EPISODES = 304  # meta-val episodes a method that is not data-free reads while it trains
#                                   (TACO's reads_metaval settings), apart from the selection's

# -- ICFIL's episode inversions (a stream, then a hash of each episode's support: dfml/evaluation/icfil.py)
ICFIL_TEST = 401  # at meta-test
ICFIL_TUNING = 402  # while tuning on meta-val

# -- a pool member's own draws, from the member's seed (dfml/untrusted.py)
UNTRUSTED_TRUE_CLASSES = 1  # the classes a deceptive_label member really learns, apart from its claimed ones


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (stable across platforms and runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def training_draw(settings: dict, *parts: int) -> int:
    """The seed of a draw that belongs to a training seed (params ``training_seeds``: the warm start, the
    meta-model's initialisation, the method's own draws): ``derive_seed(seed, *parts)`` for training seed 0
    (or a job without one), a seed derived from it and the training seed otherwise. Draws shared by every
    training seed (the pool, the episodes, ICFIL's) use :func:`derive_seed` directly."""
    base = derive_seed(settings["seed"], *parts)
    training = settings.get("training_seed") or 0
    return base if training == 0 else derive_seed(base, training)


def stream_seed(settings: dict, stream: int) -> int:
    """The root seed of a stream shared by every training seed: ``derive_seed(settings["seed"], stream)``."""
    return derive_seed(settings["seed"], stream)
