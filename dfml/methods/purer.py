"""PURER meta-training: Episode Curriculum Inversion (ECI) on a learnable pseudo dataset.

One meta-iteration (METHODS.md 2.5):

1. **Pseudo-data step**: the inversion loss of the whole pool on the pseudo dataset (member j weighted
   N - j as PURER's loop does, or equally: the method's ``member_weighting``, else
   ``inversion.member_weighting``, METHODS.md 2.3); when the curriculum switch is armed, minus ``lambda_adv`` times the MAML outer loss of one pseudo task
   drawn from the *non-detached* pseudo data (gradients flow through the inner loop into the
   images), which pushes the data toward tasks the meta-model has not mastered. One Adam step.
2. **Meta step**: a meta-batch of pseudo tasks (pseudo data detached), summed outer loss, one
   Adam step on the meta-model.
3. **The ECI switch** (:class:`EpisodeCurriculum`): armed once at the end of the warm-up, then
   whenever the meta-batch query accuracy has not exceeded its running maximum for ``patience``
   iterations. ``eci=False`` never arms it: plain episode inversion (EI), the ablation.

``adversarial_step``: ``shared`` (PURER) takes one Adam step on inversion minus ``lambda_adv`` times the
outer loss. ``separate`` (not in PURER; a diagnostic variant) steps the inversion gradient with the
pseudo data's Adam and the adversarial gradient with an Adam of its own, so a large adversarial
gradient does not inflate the moments that scale every later inversion step (dfml/studies/diagnostics.py).
Adam's step does not depend on the gradient's scale, so ``lambda_adv`` means nothing there and is
refused; the push's size is its own step size ``adversarial_lr`` (default: the inversion's lr).

ECI needs a learner whose outer loss is differentiable in the support images: first-order MAML
detaches the inner gradients, so the push could not move them, and is refused.

:class:`PurerMethod` is PURER behind the method interface (``algorithm: purer``; dfml/methods/base.py): it
needs the warm-start pseudo data and white-box members; the shared loop (dfml/methods/loop.py) drives it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.meta import MAML, Learner, Task, meta_batch_loss
from dfml.methods.base import (
    EpisodeSettings,
    MetaTrainingMethod,
    MethodInputs,
    NonFiniteLoss,
    StepLog,
    check_finite,
)
from dfml.models import FewShotNet
from dfml.scenario import inversion_members


ADVERSARIAL_STEPS = ("shared", "separate")


@dataclass
class PurerSettings(EpisodeSettings):
    iterations: int = 60000
    eci: bool = True
    lambda_adv: float = 10.0
    warmup: int = 4000
    patience: int = 6
    eval_every: int = 2000
    checkpoint_every: int = 500
    adversarial_step: str = "shared"
    adversarial_lr: float | None = None  # separate only: the push's own Adam lr (None: the inversion's lr)

    def __post_init__(self) -> None:
        if self.adversarial_step not in ADVERSARIAL_STEPS:
            raise ValueError(f"adversarial_step must be one of {ADVERSARIAL_STEPS}, got {self.adversarial_step!r}")
        if self.adversarial_lr is not None and self.adversarial_step != "separate":
            raise ValueError("adversarial_lr is the step size of the separate push: it needs "
                             "adversarial_step 'separate' (the shared step is scaled by lambda_adv)")
        if self.adversarial_lr is not None and not self.adversarial_lr > 0:
            raise ValueError(f"adversarial_lr must be > 0, got {self.adversarial_lr!r}")


def check_learner_supports_eci(learner: Learner, eci: bool) -> None:
    """ECI's push differentiates the outer loss w.r.t. the support images through the inner loop."""
    if eci and isinstance(learner, MAML) and learner.first_order:
        raise ValueError("ECI cannot run with first-order MAML (fomaml): its inner gradients are detached, so "
                         "the adversarial push cannot reach the support images; use learner 'maml', or eci: false")


class EpisodeCurriculum:
    """The ECI gradient switch: when to push the pseudo data adversarially (one step each time).

    The first push is the pseudo-data step of iteration ``warmup + 1`` (with ``warmup = 0``, the very
    first one); later pushes follow ``patience`` iterations without a new best meta-batch accuracy."""

    def __init__(self, warmup: int, patience: int, enabled: bool = True):
        if warmup < 0 or patience < 1:
            raise ValueError(f"need warmup >= 0 and patience >= 1, got warmup={warmup}, patience={patience}")
        self.warmup, self.patience, self.enabled = warmup, patience, enabled
        self.armed = enabled and warmup == 0
        self.stagnant = 0
        self.best_accuracy = -math.inf

    def observe(self, iteration: int, accuracy: float) -> bool:
        """Feed the meta-batch accuracy of ``iteration`` (1-based); True when this arms the switch."""
        if not self.enabled or iteration < self.warmup:
            return False
        if iteration == self.warmup:
            return self._arm()
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.stagnant = accuracy, 0
            return False
        self.stagnant += 1
        return self._arm() if self.stagnant >= self.patience else False

    def _arm(self) -> bool:
        self.armed, self.stagnant, self.best_accuracy = True, 0, -math.inf
        return True

    def consume(self) -> bool:
        """Whether the next pseudo-data step is adversarial; disarms the switch."""
        armed, self.armed = self.armed, False
        return armed

    def state_dict(self) -> dict:
        return {"armed": self.armed, "stagnant": self.stagnant, "best_accuracy": self.best_accuracy}

    def load_state_dict(self, state: dict) -> None:
        self.armed, self.stagnant, self.best_accuracy = state["armed"], state["stagnant"], state["best_accuracy"]


@dataclass(frozen=True)
class PseudoTaskIndices:
    """Which pseudo classes [way] and which of their slots [way, shot + query] form a task."""

    classes: torch.Tensor
    slots: torch.Tensor


def sample_task_indices(n_classes: int, slots: int, way: int, shot: int, query: int,
                        generator: torch.Generator) -> PseudoTaskIndices:
    """``way`` random pseudo classes (from any member), each with a random ``shot + query`` of its slots."""
    if n_classes < way:
        raise ValueError(f"{way}-way pseudo tasks need {way} pseudo classes, the pool covers {n_classes}")
    if slots < shot + query:
        raise ValueError(f"{shot}-shot {query}-query pseudo tasks need {shot + query} slots per class, have {slots}")
    classes = torch.randperm(n_classes, generator=generator)[:way]
    picks = torch.stack([torch.randperm(slots, generator=generator)[:shot + query] for _ in range(way)])
    return PseudoTaskIndices(classes, picks)


def gather_task(images: torch.Tensor, indices: PseudoTaskIndices, shot: int) -> Task:
    """The task's images from pseudo images [classes, slots, C, H, W], relabelled 0..way-1 (differentiable)."""
    chosen = images[indices.classes.to(images.device)[:, None], indices.slots.to(images.device)]
    way, per_class = chosen.shape[:2]
    labels = torch.arange(way, device=images.device)
    return Task(chosen[:, :shot].flatten(0, 1), labels.repeat_interleave(shot),
                chosen[:, shot:].flatten(0, 1), labels.repeat_interleave(per_class - shot))


def sample_pseudo_tasks(images: torch.Tensor, n_tasks: int, way: int, shot: int, query: int,
                        generator: torch.Generator) -> list[Task]:
    n_classes, slots = images.shape[:2]
    return [gather_task(images, sample_task_indices(n_classes, slots, way, shot, query, generator), shot)
            for _ in range(n_tasks)]


@dataclass
class IterationLog:
    iteration: int
    meta_loss: float
    meta_accuracy: float
    inversion_loss: float
    inversion_ce: float
    inversion_bn: float
    adversarial: bool
    adversarial_outer_loss: float
    eci_armed: bool
    seconds: float
    extra: dict = field(default_factory=dict)


class PurerTrainer:
    """Holds the full training state (meta-model, both optimizers, pseudo data, RNG, ECI) and steps it."""

    def __init__(self, engine: InversionEngine, pseudo: PseudoDataset, meta_model: FewShotNet, learner: Learner,
                 settings: PurerSettings, seed: int = 0):
        self.engine, self.pseudo, self.model, self.learner, self.settings = engine, pseudo, meta_model, learner, settings
        check_learner_supports_eci(learner, settings.eci)
        self.params = dict(meta_model.named_parameters())
        self.meta_optimizer = torch.optim.Adam(self.params.values(), lr=settings.outer_lr)
        self.curriculum = EpisodeCurriculum(settings.warmup, settings.patience, settings.eci)
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.last_adversarial_task: PseudoTaskIndices | None = None
        self.adversarial_optimizer = (torch.optim.Adam([pseudo.images], lr=settings.adversarial_lr or pseudo.lr)
                                      if settings.adversarial_step == "separate" else None)

    def pseudo_data_step(self) -> tuple[dict, bool, float]:
        s = self.settings
        images = self.pseudo.images
        try:
            inversion, terms = self.engine.loss(images, self.generator)
        except FloatingPointError as err:
            raise NonFiniteLoss(f"meta-iteration {self.iteration}: {err}") from None
        adversarial = self.curriculum.consume()
        if not adversarial:
            self._adam_step(self.pseudo.optimizer, self._image_gradient(inversion))
            return terms, False, float("nan")
        self.last_adversarial_task = sample_task_indices(*images.shape[:2], s.way, s.shot, s.query, self.generator)
        task = gather_task(images, self.last_adversarial_task, s.shot)
        outer, _ = self.learner.task_loss(self.model, self.params, task, training=True)
        check_finite(outer, self.iteration, "adversarial outer loss")
        if self.adversarial_optimizer is None:
            self._adam_step(self.pseudo.optimizer, self._image_gradient(inversion - s.lambda_adv * outer))
        else:  # both gradients at the same images, then one step each, each with its own moments
            adversarial_gradient = self._image_gradient(-outer)  # Adam ignores the scale: no lambda_adv
            self._adam_step(self.pseudo.optimizer, self._image_gradient(inversion))
            self._adam_step(self.adversarial_optimizer, adversarial_gradient)
        return terms, True, float(outer.detach())

    def _image_gradient(self, objective: torch.Tensor) -> torch.Tensor:
        (gradient,) = torch.autograd.grad(objective, [self.pseudo.images])
        return gradient

    def _adam_step(self, optimizer: torch.optim.Optimizer, gradient: torch.Tensor) -> None:
        images = self.pseudo.images
        optimizer.zero_grad(set_to_none=True)
        images.grad = gradient
        optimizer.step()
        images.grad = None

    def meta_step(self) -> tuple[float, float]:
        s = self.settings
        tasks = sample_pseudo_tasks(self.pseudo.images.detach(), s.meta_batch, s.way, s.shot, s.query, self.generator)
        loss, accuracy = meta_batch_loss(self.learner, self.model, self.params, tasks, training=True, reduction="sum")
        check_finite(loss, self.iteration, "meta outer loss")
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.meta_optimizer.step()
        return float(loss.detach()), float(accuracy)

    def step(self) -> IterationLog:
        start = time.perf_counter()
        self.iteration += 1
        terms, adversarial, outer_value = self.pseudo_data_step()
        meta_loss, meta_accuracy = self.meta_step()
        armed = self.curriculum.observe(self.iteration, meta_accuracy)
        return IterationLog(self.iteration, meta_loss, meta_accuracy, float(terms["total"].sum()),
                            float(terms["ce"].mean()), float(terms["bn"].mean()), adversarial, outer_value, armed,
                            time.perf_counter() - start)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "settings": asdict(self.settings),
            "meta_model": {k: v.detach().clone() for k, v in self.params.items()},
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "pseudo_images": self.pseudo.images.detach().clone(),
            "pseudo_optimizer": self.pseudo.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "curriculum": self.curriculum.state_dict(),
            **({"adversarial_optimizer": self.adversarial_optimizer.state_dict()}
               if self.adversarial_optimizer is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.pseudo.images.device
        self.iteration = state["iteration"]
        with torch.no_grad():
            for name, value in state["meta_model"].items():
                self.params[name].copy_(value)
            self.pseudo.images.copy_(state["pseudo_images"])
        self.meta_optimizer.load_state_dict(_to_device(state["meta_optimizer"], device))
        self.pseudo.optimizer.load_state_dict(_to_device(state["pseudo_optimizer"], device))
        self.generator.set_state(state["generator"].cpu())
        self.curriculum.load_state_dict(state["curriculum"])
        if self.adversarial_optimizer is not None and "adversarial_optimizer" in state:
            self.adversarial_optimizer.load_state_dict(_to_device(state["adversarial_optimizer"], device))


def _to_device(optimizer_state: dict, device: torch.device) -> dict:
    state = {k: {n: (t.to(device) if isinstance(t, torch.Tensor) and n != "step" else t) for n, t in v.items()}
             for k, v in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def purer_settings(settings: dict, shot: int) -> PurerSettings:
    """PurerSettings from a job's settings (``metatrain`` and this method's params.yaml entry)."""
    mt, method = settings["metatrain"], settings["method"]
    return PurerSettings(**EpisodeSettings.from_metatrain(mt, shot), iterations=mt["iterations"],
                         eci=method.get("eci", True),
                         lambda_adv=method.get("lambda_adv", 10.0), warmup=method.get("warmup", 4000),
                         patience=method.get("patience", 6), eval_every=mt["eval_every"],
                         checkpoint_every=mt["checkpoint_every"],
                         adversarial_step=method.get("adversarial_step", "shared"),
                         adversarial_lr=method.get("adversarial_lr"))


def member_weighting(settings: dict) -> str:
    """How the members' inversion losses are weighted in the method's own inversion steps: its entry's
    ``member_weighting`` (a comparison of the two in one run), else ``inversion.member_weighting`` (official)."""
    return settings["method"].get("member_weighting") or settings["inversion"].get("member_weighting", "official")


class PurerMethod(MetaTrainingMethod):
    """PURER (``algorithm: purer``) behind the shared loop: a :class:`PurerTrainer` on the warm-start pseudo
    dataset, with the white-box pool as inversion teachers. Its curve columns: the inversion terms and the
    ECI events."""

    algorithm = "purer"
    needs_pseudo_data = True
    access = "white_box"
    curve_fields = ("inversion_loss", "inversion_ce", "inversion_bn", "adversarial", "adversarial_outer_loss",
                    "eci_armed")

    def __init__(self, trainer: PurerTrainer):
        self.trainer = trainer
        self.meta_model = trainer.model

    @classmethod
    def build(cls, inputs: MethodInputs) -> PurerMethod:
        settings, pseudo = inputs.settings, inputs.pseudo
        s = purer_settings(settings, inputs.shot)
        if pseudo.slots_per_class < s.shot + s.query:
            raise ValueError(f"pseudo data has {pseudo.slots_per_class} slots per class, a {s.shot}-shot "
                             f"{s.query}-query task needs {s.shot + s.query}: raise inversion.slots_per_class")
        inversion = settings["inversion"]
        engine = InversionEngine(inversion_members(inputs.pool), pseudo, InversionWeights(**inversion["weights"]),
                                 mode=inversion["engine"], device=inputs.device,
                                 member_weighting=member_weighting(settings))
        return cls(PurerTrainer(engine, pseudo, inputs.meta_model, inputs.learner, s, seed=inputs.seed))

    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.trainer.params

    def step(self) -> StepLog:
        log = self.trainer.step()
        return StepLog(log.iteration, log.meta_loss, log.meta_accuracy, log.seconds,
                       {name: getattr(log, name) for name in self.curve_fields})

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def describe(self) -> str:
        s = self.trainer.settings
        return f"purer, ECI {'on' if s.eci else 'off'}, {self.trainer.engine.member_weighting} member weighting"

    def write_outputs(self, out: Path) -> None:
        self.trainer.pseudo.save(out / "pseudo_final.safetensors")
