"""Pool-level inversion loss: sum over members of L_inv(member) (METHODS 2.3, 2.6).

Each member is a frozen teacher plus its class list in head order. ``member_weighting``
says how the members' losses add up: ``official`` weights member j (0-based, pool order) by
N - j, as PURER's loop does by re-adding its running partial sum (METHODS 2.3, 6.2.1);
``equal`` weights every member 1. Under Adam the scale of a disjoint slice washes out of
the inversion step, but not out of ECI's push added beside it: official equals equal
weights with a push of lambda_adv / (N - j) on slice j. One jitter offset is drawn per
call and shared by all members, so every path computes exactly the same function (equal
to float rounding); the weights multiply the member totals after every path.

Three paths, chosen per device by ``mode="auto"`` (docs/performance.md has the numbers), each in
its own module:

* **batched** (auto on CUDA, ``dfml.inversion.batched``): members with the same architecture and
  class count run through one ``vmap(functional_call)``;
* **fused** (auto on CPU, ``dfml.inversion.fused``): the pool's CE and BN terms inside one autograd
  Function, eval-mode Conv4 teachers with a hand-derived backward (``dfml.inversion.fused_conv4``);
* **sequential**: the reference, one member at a time through the module's own forward with
  BN-statistics hooks and autograd (``member_inversion_terms`` in ``dfml.inversion.losses``).

CPU runs tune glibc's allocator once (``dfml.inversion.allocator``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dfml.inversion.allocator import tune_cpu_allocator
from dfml.inversion.batched import architecture_key, plan_batched_groups
from dfml.inversion.fused import FusedPool
from dfml.inversion.losses import (
    BNStatisticsRecorder,
    InversionWeights,
    jitter,
    member_inversion_terms,
    weighted_total,
)
from dfml.inversion.pseudo_data import (
    PseudoDataset,
    class_index_map,
    gather_member_view,
    member_class_indices,
)

# architecture_key and tune_cpu_allocator are re-exported: callers import them from here too.
__all__ = ["MEMBER_WEIGHTINGS", "MODES", "TERM_NAMES", "InversionEngine", "architecture_key", "member_weights",
           "tune_cpu_allocator"]

Mode = Literal["auto", "batched", "sequential", "fused"]
MODES = ("auto", "batched", "sequential", "fused")
TERM_NAMES = ("ce", "bn", "tv", "l2")
MEMBER_WEIGHTINGS = ("official", "equal")


def member_weights(num_members: int, weighting: str) -> Tensor:
    """Weight of each member's L_inv in the pool loss [num_members]: N - j (official) or 1 (equal)."""
    if weighting not in MEMBER_WEIGHTINGS:
        raise ValueError(f"member_weighting must be one of {MEMBER_WEIGHTINGS}, got {weighting!r}")
    if weighting == "equal":
        return torch.ones(num_members)
    return torch.arange(num_members, 0, -1, dtype=torch.float32)


@dataclass
class _Member:
    model: nn.Module
    classes: list[str]
    positions: list[int]  # rows of the pseudo images, in the member's head order


class InversionEngine:
    """Sum over a pool of teachers of the per-member inversion loss L_inv.

    ``members``: (teacher, class names in the teacher's head order). Teachers are put in
    eval mode with frozen parameters (in place) and stay where they are, or are moved
    to ``device``. ``pseudo``: the PseudoDataset (or its class-name list) whose images
    are passed to :meth:`loss`. ``mode``: "auto" (fused on CPU, batched on CUDA),
    "batched", "fused" or "sequential" (the reference loop). ``member_weighting``: "equal"
    (a plain sum, what the benchmark's reference loop computes) or "official" (PURER's N - j);
    runs take it from ``inversion.member_weighting``, whose default is "official".
    """

    def __init__(
        self,
        members: Sequence[tuple[nn.Module, Sequence[str]]],
        pseudo: PseudoDataset | Sequence[str],
        weights: InversionWeights | None = None,
        mode: Mode = "auto",
        *,
        device: torch.device | str | None = None,
        member_weighting: str = "equal",
    ):
        if mode not in MODES:
            raise ValueError(f"unknown inversion mode {mode!r}")
        if not members:
            raise ValueError("the inversion pool is empty")
        self.member_weighting = member_weighting
        self.member_weights = member_weights(len(members), member_weighting)
        self.weights = weights or InversionWeights()
        self.mode = mode
        class_names = pseudo.class_names if isinstance(pseudo, PseudoDataset) else sorted(pseudo)
        self.class_names = list(class_names)
        class_index = class_index_map(self.class_names)
        self.members = [
            self._prepare_member(model, list(classes), class_index, device)
            for model, classes in members
        ]
        self.batched_groups, self.ungrouped_ids = plan_batched_groups(
            [m.model for m in self.members], [m.positions for m in self.members]
        )
        self._fused: FusedPool | None = None  # built on first use
        if mode != "sequential" and (device is None or torch.device(device).type == "cpu"):
            tune_cpu_allocator()

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

    @property
    def num_members(self) -> int:
        return len(self.members)

    def uses_batched(self, device: torch.device) -> bool:
        return self.mode == "batched" or (self.mode == "auto" and device.type == "cuda")

    def uses_fused(self, device: torch.device) -> bool:
        return self.mode == "fused" or (self.mode == "auto" and device.type != "cuda")

    def path(self, device: torch.device | str) -> str:
        """The path :meth:`loss` takes for images on ``device``: "batched", "fused" or "sequential"."""
        device = torch.device(device)
        if self.uses_batched(device):
            return "batched"
        return "fused" if self.uses_fused(device) else "sequential"

    def fused_member_ids(self) -> list[int]:
        """Members the fused path computes with FusedConv4Teacher (the rest: autograd, per member)."""
        return self._fused_pool().fused_member_ids()

    def _fused_pool(self) -> FusedPool:
        if self._fused is None:
            models, positions = [m.model for m in self.members], [m.positions for m in self.members]
            self._fused = FusedPool(models, positions)
        return self._fused

    def loss(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, per-member terms) for pseudo images [num_classes, slots, C, H, W].

        total = sum over members j of w_j * (ce*CE + bn*BN + tv*TV + l2*L2), w_j from
        ``member_weighting``. per-member terms: detached {ce, bn, tv, l2, total}, each
        [num_members]; ce..l2 are unweighted (bn includes the first-layer multiplier), total
        is weighted by the term weights, not by w_j (each member's own L_inv).
        """
        if images.dim() != 5 or images.shape[0] != len(self.class_names):
            expected = f"[{len(self.class_names)}, slots, C, H, W]"
            raise ValueError(f"expected images {expected}, got {tuple(images.shape)}")
        jittered = jitter(images, self.weights.jitter, generator, self.weights.flip)
        if not self.uses_batched(jittered.device) and self.uses_fused(jittered.device):
            terms, member_totals = self._fused_pool().terms(jittered, self.weights)
        else:
            per_member = self._member_terms(jittered)
            terms = {name: torch.stack([t[i] for t in per_member]) for i, name in enumerate(TERM_NAMES)}
            member_totals = weighted_total(*(terms[name] for name in TERM_NAMES), self.weights)
        self._raise_if_not_finite(terms)
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = member_totals.detach()
        weights = self.member_weights.to(member_totals.device, member_totals.dtype)
        return (weights * member_totals).sum(), logged

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
        """Re-read teacher weights after they were changed or moved (batched and fused paths)."""
        for group in self.batched_groups:
            group.invalidate()
        self._fused = None
