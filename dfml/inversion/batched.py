"""The batched inversion path (auto on CUDA): members of one architecture under a single vmap.

Members with the same architecture and class count are stacked with
``torch.func.stack_module_state`` and evaluated by one ``vmap(functional_call)``; BN statistics are
computed per member inside the vmapped function (the hooks read the substituted per-member running
buffers), and only the summed term leaves vmap.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from dfml.inversion.losses import BNStatisticsRecorder, l2_prior, sum_bn_terms, total_variation


class BatchedGroup:
    """Members sharing one architecture and class count, run through a single vmap.

    ``positions``: per member, the rows of the pseudo images in the member's head order.
    """

    def __init__(self, models: list[nn.Module], positions: list[list[int]], member_ids: list[int]):
        self.member_ids = member_ids
        self.base = models[0]
        self.recorder = BNStatisticsRecorder.for_model(self.base)
        self.positions = torch.tensor(positions, dtype=torch.long)
        self._models = models
        self._stacked: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    def stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # Built lazily so CPU users of the sequential path never pay for a second copy.
        if self._stacked is None:
            self._stacked = stack_module_state(self._models)
        return self._stacked

    def terms(self, images: Tensor, first_bn_multiplier: float) -> tuple[Tensor, ...]:
        """(ce, bn, tv, l2), each [group size], for already-jittered pseudo images."""
        params, buffers = self.stacked_state()
        positions = self.positions.to(images.device)
        num_members, num_classes = positions.shape
        slots = images.shape[1]
        views = images[positions].reshape(num_members, num_classes * slots, *images.shape[2:])
        targets = torch.arange(num_classes, device=images.device).repeat_interleave(slots)

        def one_member(member_params, member_buffers, member_images):
            with self.recorder.record() as bn_terms:
                state = (member_params, member_buffers)
                logits = functional_call(self.base, state, (member_images,))
            bn = sum_bn_terms(bn_terms, first_bn_multiplier, logits)
            ce = F.cross_entropy(logits, targets)
            return ce, bn, total_variation(member_images), l2_prior(member_images)

        return vmap(one_member)(params, buffers, views)

    def invalidate(self) -> None:
        self._stacked = None


def plan_batched_groups(models: list[nn.Module],
                        positions: list[list[int]]) -> tuple[list[BatchedGroup], list[int]]:
    """(groups of two or more members sharing an :func:`architecture_key` and class count,
    ids of the members left alone, sorted)."""
    by_key: dict[tuple[str, int], list[int]] = {}
    for member_id, (model, rows) in enumerate(zip(models, positions)):
        by_key.setdefault((architecture_key(model), len(rows)), []).append(member_id)
    groups, ungrouped = [], []
    for member_ids in by_key.values():
        if len(member_ids) == 1:
            ungrouped.extend(member_ids)
        else:
            groups.append(BatchedGroup([models[i] for i in member_ids], [positions[i] for i in member_ids],
                                       member_ids))
    return groups, sorted(ungrouped)


def architecture_key(model: nn.Module) -> str:
    """Members with equal keys can share one functional_call: same code, shapes, settings."""
    try:
        config = model.config() if callable(getattr(model, "config", None)) else None
    except ValueError:  # a hand-assembled FewShotNet has no config; repr and shapes still decide
        config = None
    tensors = [
        (name, list(t.shape), str(t.dtype), str(t.device))
        for name, t in (*model.named_parameters(), *model.named_buffers())
    ]
    return json.dumps(
        [type(model).__module__, type(model).__qualname__, config, repr(model), tensors],
        sort_keys=True,
        default=str,
    )
