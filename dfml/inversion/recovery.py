"""Generator-based task recovery (BiDf-MKD, TACO: METHODS 4.1, 4.2).

One recovery trains a freshly initialised generator and its latent codes with Adam (lr 1e-3, betas
(0.5, 0.999)) for ``steps`` iterations so that one pool member labels the generated images as the
requested classes, then keeps the batch with the lowest *actual* loss (the official zero-order code
ranks batches by its surrogate, which is not the loss: METHODS 6.2.3). Each step augments the images
per image (a random crop, and a horizontal flip only with ``flip``) and normalises them as the member's data
was, before the member sees them. The official code always flips; ``flip`` defaults to False because the pool's
members are pretrained without flips (dfml/pretrain.py has no augmentation), so mirrored images are ones they
never saw (METHODS 4.5).

* :func:`recover_from_api` (black box): CE of the API's logits through the zero-order estimator
  (dfml/inversion/zeroorder.py); the surrogate <x, sg(g_hat)> carries the estimate into the generator.
  Optionally BiDf-MKD's boundary term: minus ``weight`` times the L1 distance between the API's and a
  student's logits (summed over the recovered classes, as the official code), on the images where both
  agree, which pushes the images toward the student's decision boundary. As in the official code the
  student's logits are held fixed and the term reaches the images only through the zero-order estimate of
  the API's part; ``through_student`` adds the exact gradient through the student (ours: it is white box).
* :func:`recover_from_model` (white box): CE + BN-statistics loss with exact gradients, through TACO's
  label-conditional generator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfml.inversion.augment import normalize, random_crop_flip
from dfml.inversion.generators import ConditionalGenerator, ImageGenerator, reinitialise
from dfml.inversion.losses import bn_statistics_loss
from dfml.inversion.zeroorder import zero_order_gradient


@dataclass(frozen=True)
class RecoverySettings:
    """One recovery's budget and optimiser (defaults: the papers'; METHODS 4.1, 4.2)."""

    steps: int = 200
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    latent_dim: int = 256
    generator_width: int = 64
    padding: int = 4          # augmentation: random crop of the zero-padded image
    flip: bool = False        # the pool's members are pretrained without flips (the official code flips)
    q: int = 100              # zero-order directions per image
    mu: float = 0.005         # zero-order step
    query_batch: int = 4096   # most images per API call
    bn: float = 1.0           # white box: weight of the BN-statistics term (TACO: 1)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.q < 1 or not self.mu > 0 or not self.lr > 0:
            raise ValueError(f"a recovery needs steps >= 1, q >= 1, mu > 0 and lr > 0, got {self}")


@dataclass
class RecoveredBatch:
    """``images`` [N, C, H, W] as the member saw them (normalised, not augmented), ``labels`` [N] in
    0..len(classes)-1 indexing the recovered classes, the kept batch's ``loss`` and its ``step``; the
    recovery's wall time and the part of it spent in the zero-order estimator (queries included)."""

    images: Tensor
    labels: Tensor
    loss: float
    step: int
    seconds: float = 0.0
    estimator_seconds: float = 0.0


@dataclass(frozen=True)
class BoundaryTerm:
    """BiDf-MKD's boundary query term: -weight * |api - student|_1 (summed over classes) where they agree.
    ``through_student``: also the term's exact gradient through the student (the official code holds the
    student's logits fixed)."""

    student: Callable[[Tensor], Tensor]  # images -> logits over at least the recovered classes
    weight: float = 1.0
    through_student: bool = False


def boundary_query_loss(api_logits: Tensor, labels: Tensor, student_logits: Tensor | None,
                        weight: float) -> Tensor:
    """Per image: CE(api, label) - weight * agree * sum_c |api_c - student_c|, where ``agree`` says that the API
    and the student predict the same class; plain CE without a student."""
    loss = F.cross_entropy(api_logits, labels, reduction="none")
    if student_logits is None:
        return loss
    agree = (api_logits.argmax(1) == student_logits.argmax(1)).to(loss.dtype)
    return loss - weight * agree * (api_logits - student_logits).abs().sum(1)


def relative_labels(n_classes: int, per_class: int, device=None) -> Tensor:
    """0..n-1 repeated per_class times (class by class)."""
    return torch.arange(n_classes, device=device).repeat_interleave(per_class)


class _Best:
    """The lowest-loss batch seen so far (ties keep the earlier one)."""

    def __init__(self):
        self.loss, self.images, self.step = math.inf, None, -1

    def offer(self, loss: float, images: Tensor, step: int) -> None:
        if loss < self.loss:
            self.loss, self.images, self.step = loss, images.detach().clone(), step


def augmented_view(pixels: Tensor, rng: torch.Generator, settings: RecoverySettings, mean: Sequence[float],
                   std: Sequence[float]) -> Tensor:
    """What the member sees of generated images: cropped and flipped per image, then normalised."""
    return normalize(random_crop_flip(pixels, rng, settings.padding, settings.flip), mean, std)


def optimise_generator(generator: nn.Module, z: Tensor, settings: RecoverySettings,
                       step_fn: Callable[[int], tuple[float, Tensor, Tensor]]) -> _Best:
    """Adam on the generator and ``z`` for ``settings.steps`` steps; ``step_fn(step)`` -> (actual loss, objective
    to descend, images kept). The generator's ``.grad`` is left as the last step's gradient (FREE's meta-update
    reads it: dfml/methods/free/meta_generator.py)."""
    optimizer = torch.optim.Adam([*generator.parameters(), z], lr=settings.lr, betas=settings.betas)
    best = _Best()
    for step in range(settings.steps):
        loss, objective, images = step_fn(step)
        best.offer(loss, images, step)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
    return best


def recover_from_api(api: Callable[[Tensor], Tensor], class_indices: Sequence[int], per_class: int, *,
                     channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                     settings: RecoverySettings, rng: torch.Generator, device=None,
                     boundary: BoundaryTerm | None = None) -> RecoveredBatch:
    """``per_class`` images of each API class in ``class_indices`` (logit columns), by zero-order inversion."""
    targets = torch.as_tensor(list(class_indices), device=device)
    labels = relative_labels(len(targets), per_class, device)
    generator = reinitialise(ImageGenerator(settings.latent_dim, channels, image_size, settings.generator_width),
                             rng).to(device).train()
    z = torch.randn(len(labels), settings.latent_dim, generator=rng).to(device).requires_grad_()

    def step(_: int) -> tuple[float, Tensor, Tensor]:
        pixels = generator(z)
        x = augmented_view(pixels, rng, settings, mean, std)
        with torch.set_grad_enabled(boundary is not None and boundary.through_student):
            student = boundary.student(x)[:, :len(targets)] if boundary is not None else None
        held = None if student is None else student.detach()
        weight = 0.0 if boundary is None else boundary.weight

        def loss_of(logits: Tensor, rows: Tensor) -> Tensor:
            return boundary_query_loss(logits, labels[rows], None if held is None else held[rows], weight)

        start = time.perf_counter()
        api_logits = api(x.detach())[:, targets]  # asked once: the base losses and the boundary's exact part
        base = loss_of(api_logits, torch.arange(len(labels), device=device))
        estimate = zero_order_gradient(lambda images, rows: loss_of(api(images)[:, targets], rows), x,
                                       q=settings.q, mu=settings.mu, rng=rng, max_batch=settings.query_batch,
                                       base_loss=base)
        estimator_seconds[0] += time.perf_counter() - start
        objective = (x * estimate).sum() / len(labels)
        if student is not None and boundary.through_student:  # exact, with the API's logits held fixed
            agree = (api_logits.argmax(1) == held.argmax(1)).to(x.dtype)
            objective = objective - weight * (agree * (api_logits - student).abs().sum(1)).mean()
        return float(base.mean()), objective, normalize(pixels, mean, std)

    estimator_seconds = [0.0]
    start = time.perf_counter()
    best = optimise_generator(generator, z, settings, step)
    return RecoveredBatch(best.images, labels, best.loss, best.step, time.perf_counter() - start,
                          estimator_seconds[0])


def recover_from_model(model: nn.Module, class_indices: Sequence[int], per_class: int, *, channels: int,
                       image_size: int, mean: Sequence[float], std: Sequence[float], settings: RecoverySettings,
                       rng: torch.Generator, device=None) -> RecoveredBatch:
    """``per_class`` images of each of the model's classes ``class_indices`` through TACO's conditional
    generator: CE + ``settings.bn`` * BN statistics (running statistics of the model's BN layers)."""
    targets = torch.as_tensor(list(class_indices), device=device)
    labels = relative_labels(len(targets), per_class, device)
    generator = reinitialise(ConditionalGenerator(settings.latent_dim, len(targets), channels, image_size,
                                                  settings.generator_width), rng).to(device).train()
    z = torch.randn(len(labels), settings.latent_dim, generator=rng).to(device).requires_grad_()
    model.eval()

    def step(_: int) -> tuple[float, Tensor, Tensor]:
        pixels = generator(z, labels)
        x = augmented_view(pixels, rng, settings, mean, std)
        logits, bn = bn_statistics_loss(model, x)
        loss = F.cross_entropy(logits[:, targets], labels) + settings.bn * bn
        return float(loss.detach()), loss, normalize(pixels, mean, std)

    start = time.perf_counter()
    best = optimise_generator(generator, z, settings, step)
    return RecoveredBatch(best.images, labels, best.loss, best.step, time.perf_counter() - start)
