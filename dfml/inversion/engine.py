"""Pool-level inversion loss: sum over members of L_inv(member) (METHODS 2.3, 2.6).

Each member is a frozen teacher plus its class list in head order. All members are
weighted equally (the official (N - j) weighting is a bug, METHODS 6.2.1). One jitter
offset is drawn per call and shared by all members, so the batched and sequential
paths compute exactly the same function.

Batched path: members with the same architecture and class count are stacked with
``torch.func.stack_module_state`` and evaluated by one ``vmap(functional_call)``; BN
statistics are computed per member inside the vmapped function (the hooks read the
substituted per-member running buffers), and only the summed term leaves vmap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from dfml.inversion.losses import (
    BNStatisticsRecorder,
    InversionWeights,
    jitter,
    l2_prior,
    member_inversion_terms,
    sum_bn_terms,
    total_variation,
    weighted_total,
)
from dfml.inversion.pseudo_data import (
    PseudoDataset,
    class_index_map,
    gather_member_view,
    member_class_indices,
)

Mode = Literal["auto", "batched", "sequential"]
TERM_NAMES = ("ce", "bn", "tv", "l2")


@dataclass
class _Member:
    model: nn.Module
    classes: list[str]
    positions: list[int]  # rows of the pseudo images, in the member's head order


class _BatchedGroup:
    """Members sharing one architecture and class count, run through a single vmap."""

    def __init__(self, members: list[_Member], member_ids: list[int]):
        self.member_ids = member_ids
        self.base = members[0].model
        self.recorder = BNStatisticsRecorder.for_model(self.base)
        self.positions = torch.tensor([m.positions for m in members], dtype=torch.long)
        self._models = [m.model for m in members]
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


class InversionEngine:
    """Sum over a pool of teachers of the per-member inversion loss L_inv.

    ``members``: (teacher, class names in the teacher's head order). Teachers are put in
    eval mode with frozen parameters (in place) and stay where they are, or are moved
    to ``device``. ``pseudo``: the PseudoDataset (or its class-name list) whose images
    are passed to :meth:`loss`.
    """

    def __init__(
        self,
        members: Sequence[tuple[nn.Module, Sequence[str]]],
        pseudo: PseudoDataset | Sequence[str],
        weights: InversionWeights | None = None,
        mode: Mode = "auto",
        *,
        device: torch.device | str | None = None,
    ):
        if mode not in ("auto", "batched", "sequential"):
            raise ValueError(f"unknown inversion mode {mode!r}")
        if not members:
            raise ValueError("the inversion pool is empty")
        self.weights = weights or InversionWeights()
        self.mode = mode
        class_names = pseudo.class_names if isinstance(pseudo, PseudoDataset) else sorted(pseudo)
        self.class_names = list(class_names)
        class_index = class_index_map(self.class_names)
        self.members = [
            self._prepare_member(model, list(classes), class_index, device)
            for model, classes in members
        ]
        self.batched_groups, self.ungrouped_ids = self._plan_groups()

    @staticmethod
    def _prepare_member(model, classes, class_index, device) -> _Member:
        if device is not None:
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear) and head.out_features < len(classes):
            raise ValueError(f"head has {head.out_features} outputs for {len(classes)} classes")
        BNStatisticsRecorder.for_model(model)  # hooks registered here, once per teacher
        return _Member(model, classes, member_class_indices(class_index, classes))

    def _plan_groups(self) -> tuple[list[_BatchedGroup], list[int]]:
        by_key: dict[tuple[str, int], list[int]] = {}
        for member_id, member in enumerate(self.members):
            key = (architecture_key(member.model), len(member.classes))
            by_key.setdefault(key, []).append(member_id)
        groups, ungrouped = [], []
        for member_ids in by_key.values():
            if len(member_ids) == 1:
                ungrouped.extend(member_ids)
            else:
                groups.append(_BatchedGroup([self.members[i] for i in member_ids], member_ids))
        return groups, sorted(ungrouped)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def uses_batched(self, device: torch.device) -> bool:
        return self.mode == "batched" or (self.mode == "auto" and device.type == "cuda")

    def loss(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, per-member terms) for pseudo images [num_classes, slots, C, H, W].

        total = sum over members of ce*CE + bn*BN + tv*TV + l2*L2 (equal member weights).
        per-member terms: detached {ce, bn, tv, l2, total}, each [num_members]; ce..l2
        are unweighted (bn includes the first-layer multiplier), total is weighted.
        """
        if images.dim() != 5 or images.shape[0] != len(self.class_names):
            expected = f"[{len(self.class_names)}, slots, C, H, W]"
            raise ValueError(f"expected images {expected}, got {tuple(images.shape)}")
        jittered = jitter(images, self.weights.jitter, generator, self.weights.flip)
        per_member = self._member_terms(jittered)
        terms = {name: torch.stack([t[i] for t in per_member]) for i, name in enumerate(TERM_NAMES)}
        member_totals = weighted_total(*(terms[name] for name in TERM_NAMES), self.weights)
        self._raise_if_not_finite(terms)
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = member_totals.detach()
        return member_totals.sum(), logged

    def _member_terms(self, jittered: Tensor) -> list[tuple[Tensor, ...]]:
        """(ce, bn, tv, l2) scalars for every member, in member order."""
        per_member: list[tuple[Tensor, ...] | None] = [None] * self.num_members
        if self.uses_batched(jittered.device):
            sequential_ids = self.ungrouped_ids
            for group in self.batched_groups:
                group_terms = group.terms(jittered, self.weights.first_bn_multiplier)
                for row, member_id in enumerate(group.member_ids):
                    per_member[member_id] = tuple(t[row] for t in group_terms)
        else:
            sequential_ids = range(self.num_members)
        for member_id in sequential_ids:
            per_member[member_id] = self._sequential_terms(self.members[member_id], jittered)
        return per_member

    def _sequential_terms(self, member: _Member, jittered: Tensor) -> tuple[Tensor, ...]:
        view, targets = gather_member_view(jittered, member.positions)
        return member_inversion_terms(
            member.model, view, targets, self.weights.first_bn_multiplier
        )

    @staticmethod
    def _raise_if_not_finite(terms: dict[str, Tensor]) -> None:
        values = torch.stack([terms[name].detach() for name in TERM_NAMES])  # [4, members]
        if bool(torch.isfinite(values).all()):
            return
        for member_id in range(values.shape[1]):
            for term_index, name in enumerate(TERM_NAMES):
                value = values[term_index, member_id]
                if not bool(torch.isfinite(value)):
                    kind = "nan" if bool(torch.isnan(value)) else "inf"
                    raise FloatingPointError(
                        f"inversion loss is {kind} for member {member_id} (term {name})"
                    )

    def refresh_teachers(self) -> None:
        """Re-stack teacher weights after they were changed or moved (batched path)."""
        for group in self.batched_groups:
            group.invalidate()
