"""Pool-level inversion loss: sum over members of L_inv(member) (METHODS 2.3, 2.6).

Each member is a frozen teacher plus its class list in head order. All members are
weighted equally (the official (N - j) weighting is a bug, METHODS 6.2.1). One jitter
offset is drawn per call and shared by all members, so every path computes exactly the
same function (equal to float rounding).

Three paths, chosen per device by ``mode="auto"`` (docs/performance.md has the numbers):

* **batched** (auto on CUDA): members with the same architecture and class count are
  stacked with ``torch.func.stack_module_state`` and evaluated by one
  ``vmap(functional_call)``; BN statistics are computed per member inside the vmapped
  function (the hooks read the substituted per-member running buffers), and only the
  summed term leaves vmap.
* **fused** (auto on CPU): eval-mode Conv4 teachers (dfml.models conv4) run through a
  hand-derived forward *and* backward (:class:`FusedConv4Teacher`), computed eagerly
  inside one autograd Function for the whole pool; other teachers run per member with
  autograd. TV and L2 are computed once for all members from per-class sums. On CPU the
  batched path is slower than a loop (small convolutions, vmap overhead); the fused path
  is ~3x faster than the loop (see FusedConv4Teacher for where the time went).
* **sequential**: the reference, one member at a time through the module's own forward
  with BN-statistics hooks and autograd.
"""

from __future__ import annotations

import ctypes
import json
import os
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
    bn_gap,
    bn_statistics_loss,
    jitter,
    l2_prior,
    member_inversion_terms,
    neighbour_differences,
    sum_bn_terms,
    total_variation,
    two_pass_mean_var,
    weighted_total,
)
from dfml.meta.batched import map_single_threaded
from dfml.inversion.pseudo_data import (
    PseudoDataset,
    class_index_map,
    gather_member_view,
    member_class_indices,
)

Mode = Literal["auto", "batched", "sequential", "fused"]
MODES = ("auto", "batched", "sequential", "fused")
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


# ----------------------------------------------------------------------------- fused Conv4 teacher

_aten = torch.ops.aten
_CHANNELS_LAST = torch.channels_last
# First-layer convolutions with at most this many inputs per output (C_in * 3 * 3) run as an
# explicit im2col GEMM: oneDNN handles C_in = 1 with a blocked layout plus a full-size reorder
# (measured 2.5-16 ms vs 1.5-3 ms for the GEMM on 100 x 32 x 32 x 32 outputs, one thread).
_IM2COL_MAX_PATCH = 27


class FusedConv4Teacher:
    """Inversion terms of one eval-mode Conv4 teacher with a hand-written backward.

    Same function as ``member_inversion_terms(model, ...)`` (CE and the BN-statistics term)
    and its gradient with respect to the images, computed without autograd. Where the time
    of the autograd reference went on CPU (profile: 100 images of 1 x 32 x 32, one thread,
    ~100 ms) and what this does instead (~30 ms):

    * ``var`` over (N, H, W) of NCHW maps (Welford, strided): ~20 ms for layer 1 alone, and
      its autograd backward expands full-size tensors. Here: mean, then the mean of the
      squared centred values, and an analytic gradient ``u_c (z - mean_c) + q_c`` added in
      place to the BN-input gradient.
    * NCHW ``max_pool2d``: scalar kernel, ~13 ms for layer 1; channels-last runs ~1.5 ms.
      Everything here is channels-last.
    * BN (eval) -> ReLU -> max-pool on the full map: pooled first. Eval BN is the affine map
      ``s z + t``; with the sign of ``s`` folded into the conv weights (exact: a sign flip),
      ``s`` becomes ``|s| > 0``, so ``relu(|s| maxpool(z') + t) = maxpool(relu(|s| z' + t))``
      with the same argmax, and BN + ReLU run on a quarter of the elements. The BN term is
      sign-invariant (the running mean is flipped along).
    * oneDNN's C_in = 1 convolution (blocked layout + reorder): im2col GEMM instead.

    The weights are copied (folded) at construction: call :meth:`refresh` after the
    teacher's weights change (``InversionEngine.refresh_teachers`` does).
    """

    def __init__(self, model: nn.Module):
        if not self.supports(model):
            raise ValueError("FusedConv4Teacher needs an eval-mode dfml conv4 FewShotNet with running BN statistics")
        self.model = model
        self.refresh()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        from dfml.models.base import FewShotNet
        from dfml.models.conv4 import Conv4Backbone, ConvBlock

        if type(model) is not FewShotNet or type(model.backbone) is not Conv4Backbone:
            return False
        if model.training or type(model.head) is not nn.Linear:
            return False
        for block in model.backbone.blocks:
            if type(block) is not ConvBlock or type(block.conv) is not nn.Conv2d:
                return False
            conv, norm = block.conv, block.norm
            if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != (
                (3, 3), (1, 1), (1, 1), (1, 1), 1
            ) or conv.padding_mode != "zeros" or conv.bias is None:
                return False
            if type(norm) is not nn.BatchNorm2d or norm.running_mean is None or norm.weight is None:
                return False
        return True

    @torch.no_grad()
    def refresh(self) -> None:
        model = self.model
        self.layers = []
        for block in model.backbone.blocks:
            conv, norm = block.conv, block.norm
            # Exactly the scale/shift of ATen's CPU eval batch norm: alpha = invstd * w, beta = b - mean * alpha.
            invstd = 1 / torch.sqrt(norm.running_var + norm.eps)
            scale = invstd * norm.weight
            shift = norm.bias - norm.running_mean * scale
            sign = torch.where(scale < 0, -1.0, 1.0).to(scale.dtype)
            weight = conv.weight * sign.view(-1, 1, 1, 1)
            layer = {
                "bias": conv.bias * sign,
                "abs_scale": scale.abs().view(1, -1, 1, 1),
                "shift": shift.view(1, -1, 1, 1),
                "running_mean": norm.running_mean * sign,
                "running_var": norm.running_var.clone(),
                "in_channels": conv.in_channels,
            }
            if conv.in_channels * 9 <= _IM2COL_MAX_PATCH:
                layer["matrix"] = weight.reshape(weight.shape[0], -1).t().contiguous()  # [C_in * 9, C_out]
            else:
                layer["weight"] = weight.contiguous(memory_format=_CHANNELS_LAST)
            self.layers.append(layer)
        self.head_weight = model.head.weight.detach().clone()
        self.head_bias = model.head.bias.detach().clone()
        self.adaptive = model.backbone.pooling == "adaptive"

    @torch.no_grad()
    def terms(self, images: Tensor, targets: Tensor, *, ce_weight: float, bn_weight: float,
              first_bn_multiplier: float, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(ce, bn, d(ce_weight * ce + bn_weight * bn)/d images or None) for images [B, C, H, W]."""
        h = images
        saved = []
        bn_terms = []
        for index, layer in enumerate(self.layers):
            z = self._conv(layer, h)
            mean, var = two_pass_mean_var(z)
            gap = bn_gap(mean, var, layer["running_mean"], layer["running_var"])
            bn_terms.append((index, gap.term))
            pooled, indices = F.max_pool2d_with_indices(z, 2)
            activated = torch.addcmul(layer["shift"], pooled, layer["abs_scale"]).relu_()
            if need_grad:
                saved.append((h, z, activated, indices, mean, gap))
            h = activated
        bn_total = sum_bn_terms(bn_terms, first_bn_multiplier, images)
        if self.adaptive:
            features, feature_indices = F.adaptive_max_pool2d(h, 1, return_indices=True)
            features = features.flatten(1)
        else:
            features = torch.flatten(h, 1)
        logits = F.linear(features, self.head_weight, self.head_bias)
        ce = F.cross_entropy(logits, targets)
        if not need_grad:
            return ce, bn_total, None

        batch = logits.shape[0]
        grad = torch.softmax(logits, dim=1)
        grad[torch.arange(batch, device=grad.device), targets] -= 1.0
        grad.mul_(ce_weight / batch)
        grad_h = grad @ self.head_weight
        if self.adaptive:
            grad_h = _aten.adaptive_max_pool2d_backward(grad_h.view(*grad_h.shape, 1, 1), h, feature_indices)
        else:
            grad_h = grad_h.view(h.shape)
        for index in reversed(range(len(self.layers))):
            layer = self.layers[index]
            h_in, z, activated, indices, mean, gap = saved[index]
            grad_pooled = _aten.threshold_backward(grad_h, activated, 0).mul_(layer["abs_scale"])
            grad_z = _aten.max_pool2d_with_indices_backward(
                grad_pooled, z, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
            )
            # d/dz of k (||var - rv|| + ||mean - rm||) = u (z - mean) + q; zero where a norm is 0,
            # as torch.linalg.vector_norm's backward.
            k = bn_weight * (first_bn_multiplier if index == 0 else 1.0)
            count = z.numel() // z.shape[1]
            u = torch.where(gap.var_norm > 0, gap.var_gap * (2 * k / count) / gap.var_norm,
                            torch.zeros_like(gap.var_gap))
            q = torch.where(gap.mean_norm > 0, gap.mean_gap * (k / count) / gap.mean_norm,
                            torch.zeros_like(gap.mean_gap))
            grad_z.addcmul_(z, u.view(1, -1, 1, 1)).add_((q - u * mean).view(1, -1, 1, 1))
            grad_h = self._conv_input_grad(layer, grad_z, h_in)
        return ce, bn_total, grad_h

    @staticmethod
    def _conv(layer: dict, h: Tensor) -> Tensor:
        if "matrix" in layer:
            batch, _, height, width = h.shape
            columns = _im2col3x3(h)  # [B, H, W, C_in * 9]
            out = torch.addmm(layer["bias"], columns.view(-1, columns.shape[-1]), layer["matrix"])
            return out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # channels-last [B, C, H, W]
        return F.conv2d(h.contiguous(memory_format=_CHANNELS_LAST), layer["weight"], layer["bias"], padding=1)

    @staticmethod
    def _conv_input_grad(layer: dict, grad_z: Tensor, h_in: Tensor) -> Tensor:
        if "matrix" in layer:
            batch, channels, height, width = grad_z.shape
            rows = grad_z.permute(0, 2, 3, 1).reshape(-1, channels)  # a view when grad_z is channels-last
            # [C_in * 9, B*H*W]: the wide orientation runs ~1.6x faster in MKL than [B*H*W, C_in * 9].
            planes = torch.mm(layer["matrix"], rows.t()).view(h_in.shape[1], 9, batch, height, width)
            return _col2im3x3(planes).permute(1, 0, 2, 3)
        return _aten.convolution_backward(
            grad_z, h_in.contiguous(memory_format=_CHANNELS_LAST), layer["weight"], None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False],
        )[0]


def _im2col3x3(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H, W, C * 9] patches of a 3x3, padding-1 convolution (weight order c, kh, kw)."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [B, H + 2, W + 2, C]
    taps = [padded[:, i:i + height, j:j + width, :] for i in range(3) for j in range(3)]
    return torch.stack(taps, dim=-1).reshape(batch, height, width, channels * 9)


def _col2im3x3(planes: Tensor) -> Tensor:
    """Adjoint of :func:`_im2col3x3` on tap planes [C, 9, B, H, W] -> [C, B, H, W].

    Tap (i, j) read the input at offset (i - 1, j - 1), so its plane is added back shifted by it.
    """
    channels, _, batch, height, width = planes.shape
    out = planes[:, 4].clone()
    for i in range(3):
        for j in range(3):
            if i == 1 and j == 1:
                continue
            dy, dx = i - 1, j - 1
            out[:, :, max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)] += planes[
                :, i * 3 + j, :, max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)
            ]
    return out


class _AutogradTeacher:
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
    def forward(ctx, jittered: Tensor, engine: "InversionEngine", teachers: dict,
                member_ids: list[int]):
        weights = engine.weights
        need_grad = bool(ctx.needs_input_grad[0])
        detached = jittered.detach()
        ce_values, bn_values, grads, rows, owners = [], [], [], [], []

        def run(member_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
            view, targets = gather_member_view(detached, engine.members[member_id].positions)
            return teachers[member_id].terms(
                view, targets, ce_weight=weights.ce, bn_weight=weights.bn,
                first_bn_multiplier=weights.first_bn_multiplier, need_grad=need_grad,
            )

        models = [engine.members[i].model for i in member_ids]
        for slot, (member_id, (ce, bn, grad)) in enumerate(zip(member_ids, _map_members(run, member_ids, models))):
            positions = engine.members[member_id].positions
            ce_values.append(ce)
            bn_values.append(bn)
            if need_grad:
                grads.append(grad.reshape(len(positions), *detached.shape[1:]))
                rows.extend(positions)
                owners.extend([slot] * len(positions))
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
        return grad_images, None, None, None


def _class_square_sums(jittered: Tensor) -> tuple[Tensor, ...]:
    """Per pseudo class [K]: squared norms of the 4 TV difference maps and of the images."""
    dims = tuple(range(1, jittered.dim()))
    return tuple(d.square().sum(dim=dims) for d in (*neighbour_differences(jittered), jittered))


# ----------------------------------------------------------------------------- allocator

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep large CPU buffers on glibc's heap instead of fresh mmaps (once per process).

    glibc serves allocations above a (dynamic) threshold with mmap and unmaps them on free,
    so every new 10-MB activation costs thousands of page faults: measured here, oneDNN's
    first convolution took 16 ms instead of 2.5 ms, the Conv4 inversion reference 121 ms
    instead of 100 ms per member. ``DFML_NO_MALLOC_TUNING=1`` turns this off. Returns whether
    the setting is active.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("DFML_NO_MALLOC_TUNING") or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 256 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------- engine


class InversionEngine:
    """Sum over a pool of teachers of the per-member inversion loss L_inv.

    ``members``: (teacher, class names in the teacher's head order). Teachers are put in
    eval mode with frozen parameters (in place) and stay where they are, or are moved
    to ``device``. ``pseudo``: the PseudoDataset (or its class-name list) whose images
    are passed to :meth:`loss`. ``mode``: "auto" (fused on CPU, batched on CUDA),
    "batched", "fused" or "sequential" (the reference loop).
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
        if mode not in MODES:
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
        self._fused: dict[int, FusedConv4Teacher] | None = None  # built on first use
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
        return [i for i, t in self._fused_teachers().items() if isinstance(t, FusedConv4Teacher)]

    def _fused_teachers(self) -> dict[int, "FusedConv4Teacher | _AutogradTeacher"]:
        if self._fused is None:
            self._fused = {
                member_id: FusedConv4Teacher(member.model) if FusedConv4Teacher.supports(member.model)
                else _AutogradTeacher(member.model)
                for member_id, member in enumerate(self.members)
            }
        return self._fused

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
        if not self.uses_batched(jittered.device) and self.uses_fused(jittered.device):
            terms, member_totals = self._fused_path_terms(jittered)
        else:
            per_member = self._member_terms(jittered)
            terms = {name: torch.stack([t[i] for t in per_member]) for i, name in enumerate(TERM_NAMES)}
            member_totals = weighted_total(*(terms[name] for name in TERM_NAMES), self.weights)
        self._raise_if_not_finite(terms)
        logged = {name: value.detach() for name, value in terms.items()}
        logged["total"] = member_totals.detach()
        return member_totals.sum(), logged

    def _fused_path_terms(self, jittered: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Terms and member totals [M] of the fused path (same values as the reference loop)."""
        w = self.weights
        member_ids = list(range(self.num_members))
        combined_all, ce_all, bn_all = _FusedPoolFunction.apply(jittered, self, self._fused_teachers(), member_ids)
        # TV and L2 of every member from per-class squared sums, computed once for the pool.
        sums = torch.stack(_class_square_sums(jittered))  # [5, K]
        positions = self._positions_matrix(jittered.device)
        if positions is not None:
            per_member = sums[:, positions].sum(dim=2)  # [5, M]
        else:
            per_member = torch.stack([sums[:, m.positions].sum(dim=1) for m in self.members], dim=1)
        norms = per_member.sqrt()
        tv = norms[0] + norms[1] + norms[2] + norms[3]
        l2 = norms[4]
        terms = {"ce": ce_all, "bn": bn_all, "tv": tv, "l2": l2}
        return terms, combined_all + w.tv * tv + w.l2 * l2

    def _positions_matrix(self, device: torch.device) -> Tensor | None:
        sizes = {len(m.positions) for m in self.members}
        if len(sizes) != 1:
            return None
        cached = getattr(self, "_positions_cache", None)
        if cached is None or cached.device != device:
            cached = torch.tensor([m.positions for m in self.members], dtype=torch.long, device=device)
            self._positions_cache = cached
        return cached

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
