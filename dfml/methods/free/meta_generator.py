"""FREE's meta-generator (FIVE, METHODS 4.3): one generator, never reset, fast-adapted to each teacher.

BiDf-MKD and TACO train a freshly initialised generator for about 200 steps per recovery
(dfml/inversion/recovery.py). FREE keeps one :class:`~dfml.inversion.generators.ImageGenerator` across the
whole run and meta-learns it, so that a few steps from its weights recover any teacher's classes:

* **Adaptation** (per teacher): a copy of the meta-generator and a fresh latent batch z (drawn from the run's
  ``torch.Generator``) are optimised together for ``settings.steps`` (5) Adam steps (lr 1e-3, betas 0.5 / 0.999)
  on the recovery loss

      CE(teacher(aug(x)), y) - adversarial * mean_i[agree_i * KL(p_teacher,i || p_student,i)] + bn * BN statistics

  where agree_i says that the teacher and the student (the current meta-model, frozen) predict the same class
  for image i: the images are pushed toward the student's decision boundary where the student still agrees
  with the teacher (BiDf-MKD's white-box boundary term). As in the official code the student's logits are
  computed without gradient, so the term reaches the images through the teacher only; the official code
  passes probabilities to ``F.kl_div`` (the KD bug of METHODS 4.1), ours is the KL on log-probabilities. The
  official code has no BN term (``bn`` 0, our default). Augmentation, normalisation, relative labels and the lowest-loss batch kept are those of
  dfml/inversion/recovery.py. The meta-generator itself is never touched by an adaptation.
* **Meta-update** (first order, once per generation event): for each teacher, the gradient of its last
  adaptation step's loss, taken at the weights that step started from (the gradient the last Adam step used:
  no extra teacher pass), summed over the event's teachers; then one step of a **persistent** Adam on the
  meta-generator. The official code builds a new Adam at every meta-update, so its moments never accumulate
  and each step is about lr * sign(g); ours keeps its moments, and they are part of the checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfml.inversion.augment import normalize
from dfml.inversion.generators import ImageGenerator, reinitialise
from dfml.inversion.losses import bn_statistics_loss
from dfml.inversion.recovery import (RecoveredBatch, RecoverySettings, augmented_view, optimise_generator,
                                     relative_labels)


@dataclass(frozen=True)
class AdversarialTerm:
    """FREE's boundary-seeking term: -weight * KL(teacher || student) on the images where both agree; the
    student's logits are taken without gradient (:meth:`logits`)."""

    student: Callable[[Tensor], Tensor]  # images -> logits over at least the recovered classes
    weight: float = 1.0

    def logits(self, images: Tensor) -> Tensor:
        """The student's logits, a constant of the adaptation loss: no gradient to the images or the student."""
        with torch.no_grad():
            return self.student(images)


@dataclass
class Adaptation:
    """One teacher's adaptation: the kept ``batch``; ``gradients``, the last step's gradient per meta-generator
    parameter (name -> tensor), what the first-order meta-update sums; the adapted copy ``generator`` and its
    latents ``z``."""

    batch: RecoveredBatch
    gradients: dict[str, Tensor]
    generator: nn.Module
    z: Tensor


def agreeing_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over all images of KL(p_teacher || p_student), counted only where both predict the same class
    (zero elsewhere); temperature 1, log-probabilities on both sides."""
    agree = (teacher_logits.argmax(1) == student_logits.argmax(1)).to(teacher_logits.dtype)
    teacher_log_p = F.log_softmax(teacher_logits, dim=1)
    kl = (teacher_log_p.exp() * (teacher_log_p - F.log_softmax(student_logits, dim=1))).sum(1)
    return (agree * kl).mean()


def recovery_loss(teacher_logits: Tensor, labels: Tensor, student_logits: Tensor | None = None,
                  adversarial: float = 1.0) -> Tensor:
    """CE of the teacher's logits (the recovered classes' columns) - adversarial * :func:`agreeing_kl`."""
    loss = F.cross_entropy(teacher_logits, labels)
    if student_logits is None or adversarial == 0:
        return loss
    return loss - adversarial * agreeing_kl(teacher_logits, student_logits)


def _teacher_logits(teacher: nn.Module, x: Tensor, bn: float) -> tuple[Tensor, Tensor]:
    if bn > 0:
        return bn_statistics_loss(teacher, x)
    return teacher(x), torch.zeros((), device=x.device)


class MetaGenerator:
    """The meta-generator and its persistent Adam (lr ``meta_lr``; the adaptation's betas).

    ``settings``: the adaptation (``steps``, ``lr``, ``betas``, generator size, augmentation, ``bn``); the
    initial weights are drawn from ``rng`` (:func:`~dfml.inversion.generators.reinitialise`)."""

    def __init__(self, channels: int, image_size: int, settings: RecoverySettings, meta_lr: float,
                 rng: torch.Generator, device=None):
        if not meta_lr > 0:
            raise ValueError(f"the meta-generator's lr must be positive, got {meta_lr}")
        self.settings = settings
        generator = ImageGenerator(settings.latent_dim, channels, image_size, settings.generator_width)
        self.generator = reinitialise(generator, rng).to(device).train()
        # Persistent across events (the official code re-creates it per meta-update: its moments are lost).
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=meta_lr, betas=settings.betas)

    def adapt(self, teacher: nn.Module, class_indices: Sequence[int], per_class: int, *, mean: Sequence[float],
              std: Sequence[float], rng: torch.Generator, device=None,
              adversarial: AdversarialTerm | None = None) -> Adaptation:
        """``per_class`` images of each of the teacher's classes ``class_indices`` (logit columns) from a copy of
        the meta-generator adapted ``settings.steps`` steps; the meta-generator is left as it was."""
        s = self.settings
        targets = torch.as_tensor(list(class_indices), device=device)
        labels = relative_labels(len(targets), per_class, device)
        fast = copy.deepcopy(self.generator)
        z = torch.randn(len(labels), s.latent_dim, generator=rng).to(device).requires_grad_()
        teacher.eval()

        def step(_: int) -> tuple[float, Tensor, Tensor]:
            pixels = fast(z)
            x = augmented_view(pixels, rng, s, mean, std)
            logits, bn = _teacher_logits(teacher, x, s.bn)
            student = None if adversarial is None else adversarial.logits(x)[:, :len(targets)]
            weight = 0.0 if adversarial is None else adversarial.weight
            loss = recovery_loss(logits[:, targets], labels, student, weight) + s.bn * bn
            return float(loss.detach()), loss, normalize(pixels, mean, std)

        start = time.perf_counter()
        best = optimise_generator(fast, z, s, step)
        gradients = {name: p.grad.detach().clone() for name, p in fast.named_parameters()}
        return Adaptation(RecoveredBatch(best.images, labels, best.loss, best.step, time.perf_counter() - start),
                          gradients, fast, z.detach())

    def meta_update(self, gradients: Sequence[dict[str, Tensor]]) -> None:
        """One Adam step on the sum of the adaptations' last-step gradients (first-order meta-gradient)."""
        if not gradients:
            raise ValueError("a meta-update needs the gradients of at least one adaptation")
        for name, param in self.generator.named_parameters():
            param.grad = torch.stack([g[name] for g in gradients]).sum(0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"generator": {k: v.detach().clone() for k, v in self.generator.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
