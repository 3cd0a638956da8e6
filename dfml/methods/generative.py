"""What the generator-based methods (BiDf-MKD, TACO) share: when to recover new tasks, and the distillation
loss from a pool member to the meta-model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), temperature 1, mean over images (log-probabilities on both sides)."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                    reduction="batchmean", log_target=True)


class GenerationTrigger:
    """Due on the first iteration, then after ``interval`` iterations without a new best meta-batch accuracy
    (the best is forgotten at every event: the new tasks set a new level)."""

    def __init__(self, interval: int):
        self.interval, self.stagnant, self.best, self.due = interval, 0, -math.inf, True

    def observe(self, accuracy: float, generated: bool) -> None:
        if generated:
            self.best, self.stagnant = -math.inf, 0
        if accuracy > self.best:
            self.best, self.stagnant = accuracy, 0
        else:
            self.stagnant += 1
        self.due = self.stagnant >= self.interval

    def state_dict(self) -> dict:
        return {"stagnant": self.stagnant, "best": self.best, "due": self.due}

    def load_state_dict(self, state: dict) -> None:
        self.stagnant, self.best, self.due = state["stagnant"], state["best"], state["due"]
