"""Loss terms of the per-model inversion loss L_inv (METHODS 2.3).

L_inv(M, X) = ce * CE(M(X~), y) + bn * BN(M, X~) + tv * TV(X~) + l2 * ||X~||
where X~ is X after one random circular jitter. BN statistics are read by forward
pre-hooks that are registered once per teacher (METHODS 6.2.10) and write into a
per-call list, so nothing accumulates between calls.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class InversionWeights:
    """Weights of L_inv; defaults are PURER's values (METHODS 2.3 / 7)."""

    ce: float = 1.0
    bn: float = 0.01
    first_bn_multiplier: float = 1.0
    tv: float = 1e-4
    l2: float = 1e-5
    jitter: int = 2
    flip: bool = False


def jitter(
    x: Tensor, max_shift: int, generator: torch.Generator | None = None, flip: bool = False
) -> Tensor:
    """Roll every image of ``x`` (last two dims H, W) by the same random offset.

    Offsets are drawn uniformly from [-max_shift, max_shift]^2; with ``flip`` the
    whole batch is mirrored horizontally with probability 1/2 (one coin for all).
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    shift_h, shift_w = (
        int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)
    )
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(-2, -1))
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        x = torch.flip(x, dims=(-1,))
    return x


def neighbour_differences(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Horizontal, vertical, diagonal and anti-diagonal neighbour differences over the last two dims (H, W)."""
    return (
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, :] - x[..., :-1, :],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )


def total_variation(x: Tensor) -> Tensor:
    """Sum of the Frobenius norms of the four :func:`neighbour_differences` of ``x``.

    Each norm runs over the whole batch, not per image.
    """
    return sum(torch.linalg.vector_norm(d) for d in neighbour_differences(x))


def l2_prior(x: Tensor) -> Tensor:
    """Frobenius norm of the whole tensor (not squared, not per image)."""
    return torch.linalg.vector_norm(x)


class BNGap(NamedTuple):
    """How far a batch's per-channel statistics lie from a BN layer's running statistics."""

    var_gap: Tensor  # batch variance - running_var
    mean_gap: Tensor  # batch mean - running_mean
    var_norm: Tensor  # ||var_gap||_2
    mean_norm: Tensor  # ||mean_gap||_2

    @property
    def term(self) -> Tensor:
        """The BN-statistics term of the layer: ||var_gap||_2 + ||mean_gap||_2."""
        return self.var_norm + self.mean_norm


def bn_gap(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> BNGap:
    var_gap, mean_gap = var - running_var, mean - running_mean
    return BNGap(var_gap, mean_gap, torch.linalg.vector_norm(var_gap), torch.linalg.vector_norm(mean_gap))


def two_pass_mean_var(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but 1: the mean, then the mean of the
    squared centred values (on CPU much faster than ``torch.var``'s strided Welford, see _BNGapNorms)."""
    dims = [0, *range(2, features.dim())]
    mean = features.mean(dim=dims)
    centred = features - mean.view(_channel_shape(features))
    return mean, centred.square_().mean(dim=dims)


def _channel_shape(features: Tensor) -> list[int]:
    return [1, -1] + [1] * (features.dim() - 2)


def bn_layer_term(features: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """||var_b - running_var||_2 + ||mean_b - running_mean||_2 for one BN input [N, C, H, W].

    Batch mean and biased variance are per channel over (N, H, W).
    """
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=False)
    return bn_gap(mean, var, running_mean, running_var).term


def fast_bn_layer_term(features: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """:func:`bn_layer_term` (equal to float rounding) through :class:`_BNGapNorms`, ~5x faster
    forward + backward on CPU; falls back to it inside torch.func transforms. First order only."""
    if torch._C._functorch.is_functorch_wrapped_tensor(features):
        return bn_layer_term(features, running_mean, running_var)
    return _BNGapNorms.apply(features, running_mean, running_var)


class _BNGapNorms(torch.autograd.Function):
    """``bn_layer_term`` with a two-pass mean/variance and a one-pass analytic input gradient.

    ``torch.var`` over (N, H, W) of an NCHW map is a strided Welford reduction (measured 20 ms for
    100 x 32 x 32 x 32 on one core, vs ~5 ms for mean + centred squares) and its autograd backward
    expands several full-size tensors; here d/dx = u_c (x - mean_c) + q_c in one pass. Zero
    gradient where a norm is 0, as ``vector_norm``'s backward. First order only.
    """

    @staticmethod
    def forward(ctx, features: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
        mean, var = two_pass_mean_var(features)
        gap = bn_gap(mean, var, running_mean, running_var)
        ctx.save_for_backward(features, mean, *gap)
        ctx.shape = _channel_shape(features)
        return gap.term

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        features, mean, var_gap, mean_gap, var_norm, mean_norm = ctx.saved_tensors
        count = features.numel() // features.shape[1]
        var_unit = torch.where(var_norm > 0, var_gap / var_norm, torch.zeros_like(var_gap)) * grad
        mean_unit = torch.where(mean_norm > 0, mean_gap / mean_norm, torch.zeros_like(mean_gap)) * grad
        grad_features = None
        if ctx.needs_input_grad[0]:
            u = var_unit * (2.0 / count)
            offset = mean_unit / count - u * mean
            grad_features = torch.addcmul(offset.view(ctx.shape), features, u.view(ctx.shape))
        grad_mean = -mean_unit if ctx.needs_input_grad[1] else None
        grad_var = -var_unit if ctx.needs_input_grad[2] else None
        return grad_features, grad_mean, grad_var


class BNStatisticsRecorder:
    """Forward pre-hooks on every ``nn.BatchNorm2d`` of one model, registered once.

    Use :meth:`for_model` (cached per model) rather than the constructor, so a teacher
    shared by several engines still carries exactly one hook per BN layer. Outside
    :meth:`record` the hooks do nothing, so the teacher can be used normally.
    """

    _by_model: "weakref.WeakKeyDictionary[nn.Module, BNStatisticsRecorder]" = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, model: nn.Module):
        self._terms: list[tuple[int, Tensor]] | None = None
        self._term_fn = bn_layer_term
        self._handles = []
        # Layers without running statistics (batch-stats-only BN) have nothing to match.
        bn_layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        ]
        for layer_index, layer in enumerate(bn_layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(layer_index)))
        self._layers = bn_layers
        self.num_layers = len(bn_layers)

    @classmethod
    def for_model(cls, model: nn.Module) -> "BNStatisticsRecorder":
        recorder = cls._by_model.get(model)
        if recorder is None:
            recorder = cls(model)
            cls._by_model[model] = recorder
        return recorder

    def _make_hook(self, layer_index: int):
        def hook(layer: nn.BatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
            # A deep copy of the teacher carries copies of these hooks; they must stay inert.
            if self._terms is None or layer is not self._layers[layer_index]:
                return
            if layer.running_mean is None:
                return
            # Read the buffers through the module: under functional_call/vmap they are
            # the substituted (per-member) running statistics.
            term = self._term_fn(inputs[0], layer.running_mean, layer.running_var)
            self._terms.append((layer_index, term))

        return hook

    @contextlib.contextmanager
    def record(self, fast: bool = False) -> Iterator[list[tuple[int, Tensor]]]:
        """Collect (layer_index, term) pairs of the forward passes run inside the block.

        ``fast``: terms by :func:`fast_bn_layer_term` (first-order gradients only).
        """
        if self._terms is not None:
            raise RuntimeError("BNStatisticsRecorder.record() is not re-entrant")
        terms: list[tuple[int, Tensor]] = []
        self._terms = terms
        self._term_fn = fast_bn_layer_term if fast else bn_layer_term
        try:
            yield terms
        finally:
            self._terms = None
            self._term_fn = bn_layer_term

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sum_bn_terms(
    terms: list[tuple[int, Tensor]], first_bn_multiplier: float, like: Tensor
) -> Tensor:
    """Sum recorded layer terms, scaling the first BN layer; zero when there are none."""
    if not terms:
        return like.new_zeros(())
    return sum(term * first_bn_multiplier if index == 0 else term for index, term in terms)


def bn_statistics_loss(
    model: nn.Module, x: Tensor, first_bn_multiplier: float = 1.0, *, fast: bool = False
) -> tuple[Tensor, Tensor]:
    """Run ``model(x)`` and return (logits, summed BN-statistics term); ``fast``: see ``record``."""
    recorder = BNStatisticsRecorder.for_model(model)
    with recorder.record(fast=fast) as terms:
        logits = model(x)
    return logits, sum_bn_terms(terms, first_bn_multiplier, logits)


def member_inversion_terms(
    model: nn.Module, images: Tensor, targets: Tensor, first_bn_multiplier: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unweighted (ce, bn, tv, l2) of one model on its (already jittered) images."""
    logits, bn = bn_statistics_loss(model, images, first_bn_multiplier)
    ce = F.cross_entropy(logits, targets)
    return ce, bn, total_variation(images), l2_prior(images)


def weighted_total(
    ce: Tensor, bn: Tensor, tv: Tensor, l2: Tensor, weights: InversionWeights
) -> Tensor:
    return weights.ce * ce + weights.bn * bn + weights.tv * tv + weights.l2 * l2
