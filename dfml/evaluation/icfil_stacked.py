"""ICFIL on a chunk of stacked episodes at once (``ICFILScorer.stacked``): the GPU path of batched evaluation.

The four stages of :mod:`dfml.evaluation.icfil`, each run once for E episodes instead of E times:

1. adaptation: the learner's ``adapt`` vmapped over the episodes (inner gradients by ``torch.func.grad``);
2. episode inversion: one pseudo-image tensor ``[E, n, C, H, W]``, one Adam over it (Adam is element-wise,
   so this is E Adams), the loss of every episode computed by the per-episode code vmapped and summed (so each
   episode's images get their own episode's gradient); each episode draws its noise and its jitter offsets
   from its own generator, in the per-episode path's order, and the offsets are applied by one gather;
3. calibration: the backbone weights stacked ``[E, ...]``, the per-episode contrastive loss vmapped and summed;
4. prediction of the queries, vmapped.

BatchNorm layers run on mean/var primitives inside vmap (:func:`dfml.meta.batched.batch_norm_from_primitives`:
the fused kernel's vmap backward is wrong for input gradients). A different float program from the per-episode
path: equal predictions are checked in float64 (tests/evaluation/test_batched.py). Head calibration (``head_steps >
0``) has no stacked form; such settings take the per-episode path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dfml.evaluation.icfil import (ICFILSettings, _inversion_loss, batch_statistics, contrastive_calibration_loss,
                                   episode_classifier, episode_generator, inversion_key, recorded_bn_inputs)
from dfml.meta import Learner, ProtoNet, backbone_features
from dfml.meta.batched import batch_norm_from_primitives
from dfml.meta.learners import distance_logits, functorch_inner_gradients, prototypes
from dfml.meta.params import BACKBONE_PREFIX, ParamDict, select_prefix
from dfml.meta.tasks import TaskBatch


def can_stack(grid: list[ICFILSettings]) -> bool:
    return all(settings.head_steps == 0 for settings in grid)


def stacked_grid_predictions(learner: Learner, model: nn.Module, params: ParamDict, grid: list[ICFILSettings],
                             batch: TaskBatch, seed: int, steps: int | None) -> list[Tensor]:
    """Per setting of ``grid``: ``[E, n_query]`` predicted labels (inversions shared by equal inversion knobs)."""
    if not can_stack(grid):
        raise ValueError("head calibration (head_steps > 0) has no stacked ICFIL path")
    n_way = batch.n_way
    with batch_norm_from_primitives(model):
        adapted = _adapt(learner, model, params, batch, n_way, steps)
        targets = _support_statistics(model, adapted, batch)
        inverted: dict[tuple, Tensor] = {}
        predictions = []
        for settings in grid:
            key = inversion_key(settings)
            if key not in inverted:
                inverted[key] = _invert(learner, model, adapted, targets, batch, n_way, settings, seed)
            calibrated = _calibrate(model, adapted, batch, inverted[key], n_way, settings)
            predictions.append(_predict(learner, model, calibrated, batch, n_way))
    return predictions


def _adapt(learner: Learner, model: nn.Module, params: ParamDict, batch: TaskBatch, n_way: int,
           steps: int | None) -> ParamDict:
    """Stage 1, ``[E, ...]`` weights (ProtoNet: the meta-parameters, repeated)."""
    episodes = batch.support_x.shape[0]
    if isinstance(learner, ProtoNet):
        return {name: w.detach().unsqueeze(0).expand(episodes, *w.shape).clone() for name, w in params.items()}
    steps = learner.test_steps if steps is None else steps

    def adapt(support_x: Tensor, support_y: Tensor) -> ParamDict:
        with torch.no_grad():
            return learner.adapt(model, params, support_x, support_y, steps=steps, create_graph=False, n_way=n_way)

    with functorch_inner_gradients():
        adapted = vmap(adapt, randomness="different")(batch.support_x, batch.support_y)
    if not isinstance(adapted, dict):
        raise TypeError(f"ICFIL needs a learner whose adapt() returns weights, or ProtoNet; got {learner!r}")
    return {name: w.detach() for name, w in adapted.items()}


def _support_statistics(model: nn.Module, adapted: ParamDict, batch: TaskBatch) -> list:
    """Per BN layer (mean [E, C], var [E, C]) of the real support under each episode's adapted weights."""
    def statistics(weights: ParamDict, support_x: Tensor):
        with recorded_bn_inputs(model) as bn_inputs:
            backbone_features(model, weights, support_x)
        return batch_statistics(bn_inputs)

    with torch.no_grad():
        return vmap(statistics)(adapted, batch.support_x)


def _invert(learner: Learner, model: nn.Module, adapted: ParamDict, targets: list, batch: TaskBatch, n_way: int,
            settings: ICFILSettings, seed: int) -> Tensor:
    """Stage 2: pseudo support ``[E, n_way * n_hat, C, H, W]`` (labels class-major, as the per-episode path)."""
    like = batch.support_x
    generators = [episode_generator(seed, x, y) for x, y in zip(like, batch.support_y)]
    shape = (n_way * settings.n_hat, *like.shape[2:])
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # CPU: same draw on any device
    images = noise.to(device=like.device, dtype=like.dtype).requires_grad_()
    labels = torch.arange(n_way, device=like.device).repeat_interleave(settings.n_hat)
    optimizer = torch.optim.Adam([images], lr=settings.inv_lr)

    def episode_loss(weights: ParamDict, support_x: Tensor, support_y: Tensor, pseudo: Tensor, stats) -> Tensor:
        classify = episode_classifier(learner, model, weights, support_x, support_y, n_way)
        return _inversion_loss(classify, model, pseudo, labels, stats, settings)

    with torch.enable_grad():
        for _ in range(settings.inv_steps):
            optimizer.zero_grad(set_to_none=True)
            jittered = batched_jitter(images, settings.jitter, generators)
            losses = vmap(episode_loss)(adapted, batch.support_x, batch.support_y, jittered, targets)
            losses.sum().backward()
            optimizer.step()
    return images.detach()


def batched_jitter(images: Tensor, max_shift: int, generators: list[torch.Generator]) -> Tensor:
    """``dfml.inversion.losses.jitter`` of each episode ``images[e]`` with its own generator: the same offsets
    drawn in the same order, applied to all episodes by two gathers."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    shifts = torch.stack([torch.randint(-max_shift, max_shift + 1, (2,), generator=g) for g in generators])
    shifts = shifts.to(images.device)
    height, width = images.shape[-2:]
    rows = (torch.arange(height, device=images.device) - shifts[:, :1]) % height  # torch.roll: out[i] = x[i - s]
    columns = (torch.arange(width, device=images.device) - shifts[:, 1:]) % width
    lead = images.shape[1:-2]
    view = [images.shape[0]] + [1] * len(lead)
    rows = rows.view(*view, height, 1).expand(images.shape)
    out = images.gather(-2, rows)
    columns = columns.view(*view, 1, width).expand(images.shape)
    return out.gather(-1, columns)


def _calibrate(model: nn.Module, adapted: ParamDict, batch: TaskBatch, pseudo_x: Tensor, n_way: int,
               settings: ICFILSettings) -> ParamDict:
    """Stage 3: ``cal_steps`` SGD steps of every episode's ``backbone.*`` weights on its contrastive loss."""
    pseudo_y = torch.arange(n_way, device=pseudo_x.device).repeat_interleave(settings.n_hat)
    if settings.cal_steps == 0:
        return adapted

    def episode_loss(backbone: ParamDict, support_x: Tensor, support_y: Tensor, pseudo: Tensor) -> Tensor:
        return contrastive_calibration_loss(backbone_features(model, backbone, support_x), support_y,
                                            backbone_features(model, backbone, pseudo), pseudo_y, settings.tau,
                                            settings.feature_norm)

    backbone = select_prefix(adapted, BACKBONE_PREFIX)
    for _ in range(settings.cal_steps):
        with torch.enable_grad():
            leaves = {name: w.detach().requires_grad_() for name, w in backbone.items()}
            losses = vmap(episode_loss)(leaves, batch.support_x, batch.support_y, pseudo_x)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        backbone = {name: w.detach() - settings.cal_lr * g for (name, w), g in zip(backbone.items(), grads)}
    return {**adapted, **backbone}


def _predict(learner: Learner, model: nn.Module, weights: ParamDict, batch: TaskBatch, n_way: int) -> Tensor:
    """Stage 4: ``[E, n_query]`` labels (ProtoNet: prototypes recomputed by the calibrated backbone)."""
    def logits(episode_weights: ParamDict, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        if isinstance(learner, ProtoNet):
            centres = prototypes(backbone_features(model, episode_weights, support_x), support_y, n_way)
            return distance_logits(backbone_features(model, episode_weights, query_x), centres)
        return functional_call(model, episode_weights, (query_x,))

    with torch.no_grad():
        return vmap(logits)(weights, batch.support_x, batch.support_y, batch.query_x).argmax(dim=-1)
