"""ICFIL: meta-test calibration of the adapted model with inverted pseudo support (METHODS 2.8).

No official implementation exists; this follows the reconstruction in METHODS 2.8. Per episode:

1. plain test-time adaptation of the learner on the real support ``S`` (no second-order graph);
2. **episode inversion** of the frozen adapted model: pseudo support ``X_hat ~ N(0, 1)``,
   ``n_hat`` images per class, Adam on CE + TV + L2 + BN-match, where BN-match compares the
   per-channel batch mean / biased variance at the input of every BatchNorm layer with those the
   real support induces in the adapted model (the meta-model keeps no running statistics);
3. **calibration** of the backbone (from the adapted backbone) by SGD on the contrastive loss
   between real and pseudo features (same label = positive pair), optionally followed by a few CE
   steps of the linear head on ``S`` and ``X_hat``;
4. prediction of the query batch with the calibrated model (batch-statistics BN, as plain testing).

ProtoNet has no head: the inversion targets the prototype logits, head calibration is skipped, and
the queries are classified with prototypes recomputed by the calibrated backbone.

Nothing here writes into the meta-model's parameters: every update builds new tensors, and the
inversion runs on detached copies so no ``.grad`` reaches them.

This module holds the four stages on one episode; :mod:`dfml.evaluation.icfil_stacked` runs them on stacked
episodes, and :mod:`dfml.evaluation.icfil_scoring` scores episode sets with either (ICFIL is a meta-test
calibration, tuned on meta-val: :mod:`dfml.evaluation.tuning`).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dfml.inversion.losses import bn_layer_term, jitter, l2_prior, total_variation
from dfml.meta import Learner, ProtoNet, backbone_features, infer_n_way
from dfml.meta.params import (
    BACKBONE_PREFIX,
    HEAD_PREFIX,
    ParamDict,
    loss_and_gradients,
    require_submodule,
    select_prefix,
    strip_prefix,
)

Classifier = Callable[[Tensor], Tensor]
BatchStatistics = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ICFILSettings:
    """Knobs of METHODS 2.8 (all values there are assumptions to tune on meta-val)."""

    n_hat: int = 5
    inv_steps: int = 200
    inv_lr: float = 0.25
    tv: float = 1e-4
    l2: float = 1e-5
    bn: float = 0.01
    jitter: int = 2
    tau: float = 0.1
    cal_steps: int = 5
    cal_lr: float = 0.01
    feature_norm: bool = True
    head_steps: int = 0
    head_lr: float = 0.01

    def __post_init__(self) -> None:
        _require_int(self, "n_hat", minimum=1)
        for name in ("inv_steps", "jitter", "cal_steps", "head_steps"):
            _require_int(self, name, minimum=0)
        for name in ("inv_lr", "tau", "cal_lr", "head_lr"):
            _require_number(self, name, positive=True)
        for name in ("tv", "l2", "bn"):
            _require_number(self, name, positive=False)


def _require_int(settings: ICFILSettings, name: str, minimum: int) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ICFILSettings.{name} must be an integer >= {minimum}, got {value!r}")


def _require_number(settings: ICFILSettings, name: str, positive: bool) -> None:
    value = getattr(settings, name)
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if positive else value >= 0)
    if not valid:
        raise ValueError(f"ICFILSettings.{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass
class ICFILResult:
    """What :func:`icfil_adapt` produced for one episode (all tensors detached)."""

    params: ParamDict  # calibrated backbone + (adapted or calibrated) head
    adapted: ParamDict  # after plain test-time adaptation only
    pseudo_x: Tensor
    pseudo_y: Tensor
    inversion_ce: float  # adapted model's CE on the final pseudo support (no jitter)
    calibration_loss_first: float | None  # before the first calibration step; None when cal_steps == 0
    calibration_loss_last: float | None  # after the last calibration step


# ----------------------------------------------------------------------------- contrastive loss


def contrastive_calibration_loss(real_features: Tensor, real_labels: Tensor, pseudo_features: Tensor,
                                 pseudo_labels: Tensor, tau: float, feature_norm: bool = True) -> Tensor:
    """Mean over positive pairs (i, j: pseudo_labels[j] == real_labels[i]) of -log softmax_j(z_i . z_hat / tau).

    The softmax runs over all pseudo samples, so different-class pseudo features act as negatives.
    """
    if feature_norm:
        real_features = F.normalize(real_features, dim=1)
        pseudo_features = F.normalize(pseudo_features, dim=1)
    log_probs = (real_features @ pseudo_features.T / tau).log_softmax(dim=1)
    positive = real_labels.unsqueeze(1) == pseudo_labels.unsqueeze(0)
    if torch._C._functorch.is_functorch_wrapped_tensor(log_probs):
        # Under vmap (stacked ICFIL) a mask cannot select: the same mean as a masked sum. The stacked path's
        # labels always pair: every support class has its pseudo images.
        return -(log_probs * positive).sum() / positive.sum()
    if not bool(positive.any()):
        raise ValueError("no real/pseudo pair shares a label; the contrastive loss is undefined")
    return -log_probs[positive].mean()


# ----------------------------------------------------------------------------- BN statistics


@contextmanager
def recorded_bn_inputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the input of every BatchNorm2d of ``model`` during the forward passes in the block.

    The hooks live only for the block, so they never accumulate on a shared model (METHODS 6.2.10).
    """
    inputs: list[Tensor] = []
    handles = [module.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
               for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def batch_statistics(bn_inputs: list[Tensor]) -> BatchStatistics:
    """Per-channel mean and biased variance of each recorded BN input, detached."""
    return [(x.detach().mean(dim=(0, 2, 3)), x.detach().var(dim=(0, 2, 3), unbiased=False)) for x in bn_inputs]


def forward_with_bn_match(classify: Classifier, model: nn.Module, images: Tensor,
                          targets: BatchStatistics) -> tuple[Tensor, Tensor]:
    """``classify(images)`` and the BN-match term: sum over BN layers of the unsquared L2 distances
    between the batch mean/variance of ``images`` and ``targets`` (:func:`bn_layer_term`)."""
    with recorded_bn_inputs(model) as bn_inputs:
        outputs = classify(images)
    if len(bn_inputs) != len(targets):
        raise RuntimeError(f"recorded {len(bn_inputs)} BatchNorm inputs but have {len(targets)} target statistics")
    bn = sum((bn_layer_term(x, mean, var) for x, (mean, var) in zip(bn_inputs, targets)), outputs.new_zeros(()))
    return outputs, bn


def support_bn_statistics(model: nn.Module, weights: ParamDict, support_x: Tensor) -> BatchStatistics:
    """The BN-input statistics the real support batch induces in the backbone with ``weights``."""
    with torch.no_grad(), recorded_bn_inputs(model) as bn_inputs:
        backbone_features(model, weights, support_x)
    return batch_statistics(bn_inputs)


# ----------------------------------------------------------------------------- the four stages


def adapt_on_support(learner: Learner, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor,
                     n_way: int, steps: int | None) -> ParamDict:
    """Stage 1, exactly as plain meta-testing; detached. ProtoNet: the meta-parameters unchanged."""
    if isinstance(learner, ProtoNet):
        return _detached(params)
    steps = learner.test_steps if steps is None else steps
    with torch.no_grad():
        adapted = learner.adapt(model, params, support_x, support_y, steps=steps, create_graph=False, n_way=n_way)
    if not isinstance(adapted, dict):
        raise TypeError(f"ICFIL needs a learner whose adapt() returns weights, or ProtoNet; got {learner!r}")
    return _detached(adapted)


def episode_classifier(learner: Learner, model: nn.Module, weights: ParamDict, support_x: Tensor,
                       support_y: Tensor, n_way: int) -> Classifier:
    """images -> logits of the model defined by ``weights`` (ProtoNet: prototypes of the real support)."""
    if isinstance(learner, ProtoNet):
        with torch.no_grad():
            prototypes = learner.adapt(model, weights, support_x, support_y, n_way=n_way)
        return lambda images: learner.query_logits(model, weights, prototypes, images)
    return lambda images: functional_call(model, weights, (images,))


def invert_episode(classify: Classifier, model: nn.Module, targets: BatchStatistics, n_way: int,
                   like: Tensor, settings: ICFILSettings, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stage 2: pseudo support ``[n_way * n_hat, *like.shape[1:]]`` and labels (class-major order)."""
    labels = torch.arange(n_way, device=like.device).repeat_interleave(settings.n_hat)
    noise = torch.randn((len(labels), *like.shape[1:]), generator=generator)  # CPU: same draw on any device
    images = noise.to(device=like.device, dtype=like.dtype).requires_grad_()
    optimizer = torch.optim.Adam([images], lr=settings.inv_lr)
    with torch.enable_grad():
        for _ in range(settings.inv_steps):
            optimizer.zero_grad(set_to_none=True)
            _inversion_loss(classify, model, jitter(images, settings.jitter, generator), labels, targets,
                            settings).backward()
            optimizer.step()
    return images.detach(), labels


def _inversion_loss(classify: Classifier, model: nn.Module, images: Tensor, labels: Tensor,
                    targets: BatchStatistics, settings: ICFILSettings) -> Tensor:
    if settings.bn > 0:
        logits, bn = forward_with_bn_match(classify, model, images, targets)
    else:
        logits, bn = classify(images), images.new_zeros(())
    return (F.cross_entropy(logits, labels) + settings.tv * total_variation(images)
            + settings.l2 * l2_prior(images) + settings.bn * bn)


def calibrate_backbone(model: nn.Module, weights: ParamDict, support_x: Tensor, support_y: Tensor,
                       pseudo_x: Tensor, pseudo_y: Tensor, settings: ICFILSettings,
                       diagnostics: bool = True) -> tuple[ParamDict, float | None, float | None]:
    """Stage 3: ``cal_steps`` SGD steps of the ``backbone.*`` weights on the contrastive loss.

    Returns the new weights (head untouched) and the loss before the first / after the last step (the
    last: None without ``diagnostics``, which saves a forward pass that changes nothing).
    Real and pseudo images go through the backbone in separate batches (separate BN statistics).
    """
    def loss_fn(backbone: ParamDict) -> Tensor:
        return contrastive_calibration_loss(
            backbone_features(model, backbone, support_x), support_y,
            backbone_features(model, backbone, pseudo_x), pseudo_y, settings.tau, settings.feature_norm)

    if settings.cal_steps == 0:
        return dict(weights), None, None
    backbone = select_prefix(weights, BACKBONE_PREFIX)
    first = None
    for _ in range(settings.cal_steps):
        loss, grads = loss_and_gradients(loss_fn, backbone)
        first = float(loss) if first is None else first
        backbone = {name: w - settings.cal_lr * grads[name] for name, w in backbone.items()}
    last = None
    if diagnostics:
        with torch.no_grad():
            last = float(loss_fn(backbone))
    return {**weights, **backbone}, first, last


def calibrate_head(model: nn.Module, weights: ParamDict, support_x: Tensor, support_y: Tensor,
                   pseudo_x: Tensor, pseudo_y: Tensor, settings: ICFILSettings) -> ParamDict:
    """Optional: ``head_steps`` SGD steps of the ``head.*`` weights, CE on real + pseudo features."""
    if settings.head_steps == 0:
        return weights
    head = require_submodule(model, "head")
    with torch.no_grad():  # the backbone is fixed here; separate BN batches as in calibration
        features = torch.cat([backbone_features(model, weights, support_x),
                              backbone_features(model, weights, pseudo_x)])
    labels = torch.cat([support_y, pseudo_y])
    head_weights = select_prefix(weights, HEAD_PREFIX)

    def loss_fn(candidate: ParamDict) -> Tensor:
        return F.cross_entropy(functional_call(head, strip_prefix(candidate, HEAD_PREFIX), (features,)), labels)

    for _ in range(settings.head_steps):
        _, grads = loss_and_gradients(loss_fn, head_weights)
        head_weights = {name: w - settings.head_lr * grads[name] for name, w in head_weights.items()}
    return {**weights, **head_weights}


# ----------------------------------------------------------------------------- public entry points


@dataclass(frozen=True)
class InvertedEpisode:
    """Stages 1-2 of one episode: what every calibration setting with the same inversion knobs shares."""

    adapted: ParamDict
    pseudo_x: Tensor
    pseudo_y: Tensor
    inversion_ce: float  # nan when computed without diagnostics


INVERSION_FIELDS = ("n_hat", "inv_steps", "inv_lr", "tv", "l2", "bn", "jitter")


def inversion_key(settings: ICFILSettings) -> tuple:
    """Settings with equal keys produce the same pseudo support for an episode (stage 3 does not
    draw random numbers), so a sweep over calibration knobs can invert once per episode."""
    return tuple(getattr(settings, name) for name in INVERSION_FIELDS)


def adapt_and_invert(learner: Learner, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor,
                     settings: ICFILSettings = ICFILSettings(), seed: int = 0, *,
                     steps: int | None = None, diagnostics: bool = True) -> InvertedEpisode:
    """Stages 1-2 on one support set; the pseudo data depend only on ``seed``, the inversion knobs and
    the support set (:func:`episode_generator`). ``diagnostics``: also the adapted model's CE on the
    pseudo support (an extra forward pass; ``nan`` without)."""
    _refuse_running_stat_updates(model)
    n_way = infer_n_way(support_y, support_y)
    generator = episode_generator(seed, support_x, support_y)
    adapted = adapt_on_support(learner, model, params, support_x, support_y, n_way, steps)
    classify = episode_classifier(learner, model, adapted, support_x, support_y, n_way)
    targets = support_bn_statistics(model, adapted, support_x)
    pseudo_x, pseudo_y = invert_episode(classify, model, targets, n_way, support_x, settings, generator)
    inversion_ce = float("nan")
    if diagnostics:
        with torch.no_grad():
            inversion_ce = float(F.cross_entropy(classify(pseudo_x), pseudo_y))
    return InvertedEpisode(adapted, pseudo_x, pseudo_y, inversion_ce)


def calibrate(learner: Learner, model: nn.Module, inverted: InvertedEpisode, support_x: Tensor, support_y: Tensor,
              settings: ICFILSettings, diagnostics: bool = True) -> ICFILResult:
    """Stage 3 (backbone, then optionally head) from the adapted weights and pseudo support of stages 1-2."""
    x_hat, y_hat = inverted.pseudo_x, inverted.pseudo_y
    calibrated, first, last = calibrate_backbone(model, inverted.adapted, support_x, support_y, x_hat, y_hat, settings,
                                                 diagnostics)
    if not isinstance(learner, ProtoNet):
        calibrated = calibrate_head(model, calibrated, support_x, support_y, x_hat, y_hat, settings)
    return ICFILResult(calibrated, inverted.adapted, x_hat, y_hat, inverted.inversion_ce, first, last)


def icfil_adapt(learner: Learner, model: nn.Module, params: ParamDict, support_x: Tensor, support_y: Tensor,
                settings: ICFILSettings = ICFILSettings(), seed: int = 0, *,
                steps: int | None = None) -> ICFILResult:
    """Stages 1-3 on one support set. ``steps``: test-time steps, default ``learner.test_steps``."""
    inverted = adapt_and_invert(learner, model, params, support_x, support_y, settings, seed, steps=steps)
    return calibrate(learner, model, inverted, support_x, support_y, settings)


def icfil_query_logits(learner: Learner, model: nn.Module, weights: ParamDict, support_x: Tensor,
                       support_y: Tensor, query_x: Tensor) -> Tensor:
    """Stage 4: logits of the whole query batch under ``weights`` (ProtoNet: prototypes recomputed)."""
    n_way = infer_n_way(support_y, support_y)
    classify = episode_classifier(learner, model, weights, support_x, support_y, n_way)
    with torch.no_grad():
        return classify(query_x)


def episode_generator(seed: int, support_x: Tensor, support_y: Tensor) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the bytes of the support set."""
    digest = hashlib.sha256(str(int(seed)).encode())
    for tensor in (support_x.detach().float(), support_y.detach().long()):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)


# ----------------------------------------------------------------------------- helpers


def _refuse_running_stat_updates(model: nn.Module) -> None:
    # A train-mode BN with running buffers would rewrite them at every one of the T_inv forward passes.
    if model.training and any(isinstance(m, nn.BatchNorm2d) and m.track_running_stats for m in model.modules()):
        raise ValueError("ICFIL would overwrite the model's BatchNorm running statistics: use a batch-statistics "
                         "model (build_model(..., batch_stats_only=True)) or call model.eval()")


def _detached(params: ParamDict) -> ParamDict:
    # Copies, so that no tensor handed back shares storage with the meta-model's parameters.
    return {name: w.detach().clone() for name, w in params.items()}


__all__ = [
    "ICFILResult",
    "ICFILSettings",
    "InvertedEpisode",
    "adapt_and_invert",
    "adapt_on_support",
    "batch_statistics",
    "calibrate",
    "calibrate_backbone",
    "calibrate_head",
    "contrastive_calibration_loss",
    "episode_classifier",
    "episode_generator",
    "forward_with_bn_match",
    "icfil_adapt",
    "icfil_query_logits",
    "inversion_key",
    "invert_episode",
    "recorded_bn_inputs",
    "support_bn_statistics",
]
