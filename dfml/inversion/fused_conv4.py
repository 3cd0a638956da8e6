"""Inversion terms of one eval-mode Conv4 teacher with a hand-derived forward and backward (CPU kernels).

The fused path of :class:`dfml.inversion.engine.InversionEngine` (``dfml.inversion.fused``) runs
every supported Conv4 teacher through :class:`FusedConv4Teacher`; docs/performance.md has the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfml.inversion.losses import bn_gap, sum_bn_terms, two_pass_mean_var

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
