"""The sequential reference of one PURER meta-iteration (non-adversarial, METHODS 2.5).

What the official loop does, minus its disk reloads: teachers stay resident in memory, but
every member is run one after the other through its own module forward (BN statistics read
by hooks, METHODS 2.3) with plain autograd, and every task of the meta-batch through
``learner.task_loss`` in a Python loop. It uses the project's modules and loss functions and
draws its random numbers in the same order as :class:`dfml.methods.purer.PurerTrainer`, so
from the same state both compute the same step (the benchmark checks the gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfml.inversion.losses import InversionWeights, jitter, member_inversion_terms, weighted_total
from dfml.inversion.pseudo_data import gather_member_view
from dfml.meta import Learner
from dfml.methods.purer import PurerSettings, sample_pseudo_tasks


class ReferencePurer:
    """Pseudo images + meta-model state and a per-member / per-task loop step.

    ``members``: (teacher, positions of its classes in the pseudo images, head order).
    The teachers are used as they are (eval mode, frozen). ``images`` and ``meta_model`` are
    copied, so the reference owns its state and its two Adam optimisers.
    """

    def __init__(self, members: Sequence[tuple[nn.Module, Sequence[int]]], images: Tensor,
                 meta_model: nn.Module, learner: Learner, settings: PurerSettings,
                 weights: InversionWeights | None = None, *, seed: int = 0, pseudo_lr: float = 0.25):
        self.members = [(model, list(positions)) for model, positions in members]
        self.weights = weights or InversionWeights()
        self.images = nn.Parameter(images.detach().clone())
        self.pseudo_optimizer = torch.optim.Adam([self.images], lr=pseudo_lr)
        self.model = meta_model
        self.params = dict(meta_model.named_parameters())
        self.meta_optimizer = torch.optim.Adam(self.params.values(), lr=settings.outer_lr)
        self.learner, self.settings = learner, settings
        self.generator = torch.Generator().manual_seed(seed)

    def inversion_loss(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Sum over members of L_inv, one member at a time."""
        w = self.weights
        jittered = jitter(images, w.jitter, generator, w.flip)
        total = images.new_zeros(())
        for model, positions in self.members:
            view, targets = gather_member_view(jittered, positions)
            ce, bn, tv, l2 = member_inversion_terms(model, view, targets, w.first_bn_multiplier)
            total = total + weighted_total(ce, bn, tv, l2, w)
        return total

    def inversion_gradient(self) -> Tensor:
        (grad,) = torch.autograd.grad(self.inversion_loss(self.images, self.generator), [self.images])
        return grad

    def pseudo_data_step(self) -> None:
        grad = self.inversion_gradient()
        self.pseudo_optimizer.zero_grad(set_to_none=True)
        self.images.grad = grad
        self.pseudo_optimizer.step()
        self.images.grad = None

    def meta_loss(self) -> Tensor:
        """Summed MAML outer loss of a meta-batch, one task at a time."""
        s = self.settings
        tasks = sample_pseudo_tasks(self.images.detach(), s.meta_batch, s.way, s.shot, s.query, self.generator)
        losses = [self.learner.task_loss(self.model, self.params, task, training=True)[0] for task in tasks]
        return torch.stack(losses).sum()

    def meta_step(self) -> None:
        loss = self.meta_loss()
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.meta_optimizer.step()

    def step(self) -> None:
        self.pseudo_data_step()
        self.meta_step()
