"""The fused inversion path (auto on CPU): the whole pool's CE and BN terms in one autograd Function.

Eval-mode Conv4 teachers run through a hand-derived forward *and* backward
(:class:`dfml.inversion.fused_conv4.FusedConv4Teacher`), computed eagerly inside one autograd Function
for the whole pool, one member per core; other teachers run per member with autograd
(:class:`AutogradTeacher`). TV and L2 are computed once for all members from per-class sums. On CPU
the batched path is slower than a loop (small convolutions, vmap overhead); this one is ~3x faster
than the loop (docs/performance.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfml.inversion.fused_conv4 import FusedConv4Teacher
from dfml.inversion.losses import InversionWeights, bn_statistics_loss, neighbour_differences
from dfml.inversion.pseudo_data import gather_member_view
from dfml.meta.batched import map_single_threaded


class FusedPool:
    """Every member's (ce, bn, tv, l2) on the fused path; ``positions``: per member, the rows of the
    pseudo images in its head order.

    The Conv4 teachers' weights are copied at construction: build a new one after they change.
    """

    def __init__(self, models: list[nn.Module], positions: list[list[int]]):
        self.teachers = [
            FusedConv4Teacher(model) if FusedConv4Teacher.supports(model) else AutogradTeacher(model)
            for model in models
        ]
        self.positions = positions
        self._positions_matrix: Tensor | None = None

    def fused_member_ids(self) -> list[int]:
        """Members computed with FusedConv4Teacher (the rest: autograd, per member)."""
        return [i for i, teacher in enumerate(self.teachers) if isinstance(teacher, FusedConv4Teacher)]

    def terms(self, jittered: Tensor, weights: InversionWeights) -> tuple[dict[str, Tensor], Tensor]:
        """Unweighted terms {ce, bn, tv, l2} and weighted member totals, each [M] (same values as the
        sequential reference)."""
        combined, ce, bn = _FusedPoolFunction.apply(jittered, self, weights)
        tv, l2 = self._tv_and_l2(jittered)
        return {"ce": ce, "bn": bn, "tv": tv, "l2": l2}, combined + weights.tv * tv + weights.l2 * l2

    def _tv_and_l2(self, jittered: Tensor) -> tuple[Tensor, Tensor]:
        """TV and L2 of every member [M] from per-class squared sums, computed once for the pool."""
        sums = torch.stack(_class_square_sums(jittered))  # [5, K]
        positions = self._positions_tensor(jittered.device)
        if positions is not None:
            per_member = sums[:, positions].sum(dim=2)  # [5, M]
        else:
            per_member = torch.stack([sums[:, rows].sum(dim=1) for rows in self.positions], dim=1)
        norms = per_member.sqrt()
        return norms[0] + norms[1] + norms[2] + norms[3], norms[4]

    def _positions_tensor(self, device: torch.device) -> Tensor | None:
        """[M, classes per member], or None when members see different numbers of classes."""
        if len({len(rows) for rows in self.positions}) != 1:
            return None
        if self._positions_matrix is None or self._positions_matrix.device != device:
            self._positions_matrix = torch.tensor(self.positions, dtype=torch.long, device=device)
        return self._positions_matrix


class AutogradTeacher:
    """Any other teacher on the fused path: its own forward with BN hooks, gradient by autograd,
    BN terms by ``fast_bn_layer_term`` (the strided ``var`` was ~25% of a ResNet-18 member)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def terms(self, images: Tensor, targets: Tensor, *, ce_weight: float, bn_weight: float,
              first_bn_multiplier: float, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        with torch.enable_grad() if need_grad else torch.no_grad():
            x = images.detach().requires_grad_(need_grad)
            logits, bn = bn_statistics_loss(self.model, x, first_bn_multiplier, fast=True)
            ce = F.cross_entropy(logits, targets)
            if not need_grad:
                return ce, bn, None
            (grad,) = torch.autograd.grad(ce_weight * ce + bn_weight * bn, [x], allow_unused=True,
                                          materialize_grads=True)
        return ce.detach(), bn.detach(), grad


def _map_members(fn, member_ids: list[int], models: list[nn.Module]) -> list:
    """``[fn(m) for m in member_ids]``, on CPU one member per core (``map_single_threaded``).

    ``DFML_MEMBER_WORKERS`` overrides the worker count (1: intra-op threading as usual).
    """
    workers = int(os.environ.get("DFML_MEMBER_WORKERS", torch.get_num_threads()))
    if any(p.is_cuda for model in models[:1] for p in model.parameters()):
        workers = 1  # CPU parallelism only; on a GPU the kernels are asynchronous anyway
    if len({id(model) for model in models}) < len(models):
        workers = 1  # a teacher listed twice: its BN recorder must not run in two threads at once
    return map_single_threaded(fn, member_ids, workers)


class _FusedPoolFunction(torch.autograd.Function):
    """The fused members' ``ce_weight * ce + bn_weight * bn`` [M] with gradients computed eagerly.

    Outputs (combined [M], ce [M], bn [M]); only ``combined`` is differentiable. The backward
    scales each member's stored image gradient by the incoming gradient of its entry and adds
    it into the member's class rows. First order only (the teachers are frozen, nothing
    differentiates the inversion gradient again).
    """

    @staticmethod
    def forward(ctx, jittered: Tensor, pool: FusedPool, weights: InversionWeights):
        need_grad = bool(ctx.needs_input_grad[0])
        detached = jittered.detach()
        ce_values, bn_values, grads, rows, owners = [], [], [], [], []

        def run(member_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
            view, targets = gather_member_view(detached, pool.positions[member_id])
            return pool.teachers[member_id].terms(
                view, targets, ce_weight=weights.ce, bn_weight=weights.bn,
                first_bn_multiplier=weights.first_bn_multiplier, need_grad=need_grad,
            )

        member_ids = list(range(len(pool.teachers)))
        models = [teacher.model for teacher in pool.teachers]
        for member_id, (ce, bn, grad) in zip(member_ids, _map_members(run, member_ids, models)):
            positions = pool.positions[member_id]
            ce_values.append(ce)
            bn_values.append(bn)
            if need_grad:
                grads.append(grad.reshape(len(positions), *detached.shape[1:]))
                rows.extend(positions)
                owners.extend([member_id] * len(positions))
        ce_all, bn_all = torch.stack(ce_values), torch.stack(bn_values)
        combined = weights.ce * ce_all + weights.bn * bn_all
        if need_grad:
            ctx.save_for_backward(torch.cat(grads))
            ctx.rows = torch.tensor(rows, dtype=torch.long, device=jittered.device)
            ctx.owners = torch.tensor(owners, dtype=torch.long, device=jittered.device)
            ctx.shape = detached.shape
        ctx.mark_non_differentiable(ce_all, bn_all)
        return combined, ce_all, bn_all

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined, _grad_ce, _grad_bn):
        (grads,) = ctx.saved_tensors
        scale = grad_combined[ctx.owners].view(-1, *([1] * (grads.dim() - 1)))
        grad_images = grads.new_zeros(ctx.shape)
        grad_images.index_add_(0, ctx.rows, grads * scale)
        return grad_images, None, None


def _class_square_sums(jittered: Tensor) -> tuple[Tensor, ...]:
    """Per pseudo class [K]: squared norms of the 4 TV difference maps and of the images."""
    dims = tuple(range(1, jittered.dim()))
    return tuple(d.square().sum(dim=dims) for d in (*neighbour_differences(jittered), jittered))
