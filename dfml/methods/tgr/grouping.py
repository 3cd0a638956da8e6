"""Partitions of the pool into groups of members (TGR, METHODS 4.4), from the members' pairwise similarity.

* ``dissimilar`` (TGR's): spectral clustering with the *dissimilarity* matrix as the affinity, so members
  that differ are "connected" and a group gathers mutually dissimilar (heterogeneous) members. Spectral
  clustering only relaxes that objective: on a clean block structure of similar members the relaxed
  problem is degenerate and the groups it returns are often unbalanced (docs/tgr.md).
* ``heterogeneous`` (ours): balanced groups that maximise the summed within-group dissimilarity directly,
  by pairwise exchanges from a seeded balanced start (anticlustering); on a block structure each group
  takes one member of each block.
* ``similar``: spectral clustering on the similarity matrix: homogeneous groups (the study's contrast).
* ``random``: a seeded random partition into balanced groups (sizes differ by at most one).

Every member is grouped (the official code cuts the matrix to its first 100 rows and columns).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GROUPINGS = ("dissimilar", "heterogeneous", "similar", "random")


def group_members(similarity: Tensor, groups: int, how: str, seed: int) -> list[list[int]]:
    """``groups`` lists of member indices (ascending) partitioning all members of the [n, n] ``similarity``."""
    if how not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {how!r}")
    similarity = torch.as_tensor(similarity, dtype=torch.float64).cpu()
    n = similarity.shape[0]
    if similarity.dim() != 2 or similarity.shape[1] != n:
        raise ValueError(f"the similarity matrix must be square, got shape {tuple(similarity.shape)}")
    if not 1 <= groups <= n:
        raise ValueError(f"cannot split {n} members into {groups} groups: groups must lie in 1..{n} "
                         f"(lower groups, or use a larger pool)")
    if groups == 1 or groups == n:
        labels = np.zeros(n, dtype=int) if groups == 1 else np.arange(n)
    elif how == "random":
        labels = balanced_labels(n, groups)[np.random.default_rng(seed).permutation(n)]
    elif how == "heterogeneous":
        labels = anticlusters(1.0 - similarity.numpy(), groups, seed)
    else:
        affinity = 1.0 - similarity if how == "dissimilar" else similarity
        labels = spectral_labels(affinity.numpy(), groups, seed)
    return [sorted(int(i) for i in np.flatnonzero(labels == g)) for g in range(groups)]


def spectral_labels(affinity: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """scikit-learn's spectral clustering on a precomputed affinity (TGR's settings: n_init 30)."""
    from sklearn.cluster import SpectralClustering

    affinity = np.clip((affinity + affinity.T) / 2, 0.0, None)  # symmetric, non-negative: a graph's weights
    return SpectralClustering(n_clusters=groups, affinity="precomputed", n_init=30,
                              random_state=seed).fit_predict(affinity)


def balanced_labels(n: int, groups: int) -> np.ndarray:
    """0, 1, ..., groups-1, 0, 1, ...: group sizes differing by at most one."""
    return np.arange(n) % groups


def anticlusters(dissimilarity: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """Balanced groups maximising the summed within-group dissimilarity: from a seeded balanced partition,
    swap two members of different groups while some swap raises it (best swap first)."""
    labels = balanced_labels(len(dissimilarity), groups)[np.random.default_rng(seed).permutation(len(dissimilarity))]
    dissimilarity = (dissimilarity + dissimilarity.T) / 2
    while True:
        # to_group[i, g]: member i's summed dissimilarity to the members of group g
        to_group = dissimilarity @ (labels[:, None] == np.arange(groups)[None, :])
        own = to_group[np.arange(len(labels)), labels]
        # swapping i and j moves i into j's group and j into i's: the within-group sum changes by
        gain = (to_group[:, labels] - own[:, None]) + (to_group[:, labels].T - own[None, :]) - 2 * dissimilarity
        gain[labels[:, None] == labels[None, :]] = -np.inf
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if not gain[i, j] > 1e-12:
            return labels
        labels[i], labels[j] = labels[j], labels[i]
