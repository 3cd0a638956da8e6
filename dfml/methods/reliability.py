"""TACO's automatic model selection: learnable model-reliability weights (METHODS.md 4.2).

One logit ``w_m`` per pool member (initialised to 1). At each generation event a candidate subset
of ``candidate_size`` members is drawn uniformly (the whole pool when ``candidate_size`` is None or
covers it), then ``k`` members are sampled without replacement with probability softmax(w) over the
candidates. Once the event's reward R arrives, one Adam step is taken on the REINFORCE loss
``-(R - b) * log p(selection)``, where b is the running mean of the rewards seen so far (``baseline``
until the first reward, 40 in TACO). Members whose tasks pay off gain probability; untrusted ones
(task-distribution corruption) lose it.

``log p`` is the exact (Plackett-Luce) probability of the drawn sequence m_1..m_k:
``sum_i [w_{m_i} - logsumexp(w over the candidates not drawn before step i)]``. The official code
draws with ``torch.multinomial`` without replacement but sums ``log_softmax`` over all candidates,
which is not the probability of what was drawn once k > 1.

Baseline order: the advantage uses the baseline *before* the current reward
(``R - (baseline if no reward yet else mean of the previous rewards)``); the running mean then
includes R.

The reward is just a number here. TACO's published reward is the mean accuracy (%) on real meta-val
episodes, which is not data-free; a data-free reward (computed on synthetic data) is built elsewhere.
All randomness comes from the ``torch.Generator`` passed to :meth:`ReliabilityWeights.sample`, and
:meth:`ReliabilityWeights.state_dict` holds only tensors and numbers (for :mod:`dfml.checkpoint`),
so a resumed run draws and updates exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    members: list[int]  # sampled member indices in draw order
    candidates: list[int]  # the candidate subset (sorted)


class ReliabilityWeights:
    """Per-member logits, Plackett-Luce sampling over a candidate subset, REINFORCE updates."""

    def __init__(self, n_members: int, *, lr: float = 0.1, baseline: float = 40.0,
                 candidate_size: int | None = None, init: float = 1.0):
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if candidate_size is not None and candidate_size < 1:
            raise ValueError(f"candidate_size must be >= 1 (or None for the whole pool), got {candidate_size}")
        if not (math.isfinite(baseline) and math.isfinite(init)):
            raise ValueError(f"baseline and init must be finite, got {baseline!r}, {init!r}")
        self.n_members = int(n_members)
        self.candidate_size = None if candidate_size is None else int(candidate_size)
        self.initial_baseline = float(baseline)
        self._w = torch.full((self.n_members,), float(init), dtype=torch.float64, requires_grad=True)
        self._optimizer = torch.optim.Adam([self._w], lr=lr)
        self.count = 0  # rewards seen so far
        self.mean = 0.0  # their running mean

    def sample(self, k: int, rng: torch.Generator) -> Selection:
        """Draw the candidates, then ``k`` distinct members from them, in draw order."""
        n = self.n_members
        if self.candidate_size is None or self.candidate_size >= n:
            candidates = list(range(n))
        else:
            candidates = sorted(torch.randperm(n, generator=rng)[: self.candidate_size].tolist())
        if not 1 <= k <= len(candidates):
            raise ValueError(f"k must be in [1, {len(candidates)}] (the number of candidates), got {k}")
        remaining, members = list(candidates), []
        with torch.no_grad():
            for _ in range(k):
                probs = torch.softmax(self._w[remaining], dim=0)
                members.append(remaining.pop(int(torch.multinomial(probs, 1, generator=rng))))
        return Selection(members=members, candidates=candidates)

    def log_probability(self, selection: Selection) -> torch.Tensor:
        """Plackett-Luce log-probability of the drawn sequence; differentiable w.r.t. the logits."""
        remaining = list(selection.candidates)
        if len(set(selection.members)) != len(selection.members) or not set(selection.members) <= set(remaining):
            raise ValueError(f"selection members {selection.members} must be distinct candidates {remaining}")
        total = self._w.new_zeros(())
        for member in selection.members:
            total = total + self._w[member] - torch.logsumexp(self._w[remaining], dim=0)
            remaining.remove(member)
        return total

    def update(self, selection: Selection, reward: float) -> dict:
        """One Adam step on ``-(R - b) * log p(selection)``; then the baseline includes R."""
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        baseline = self.initial_baseline if self.count == 0 else self.mean
        advantage = reward - baseline
        loss = -advantage * self.log_probability(selection)
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        self.count += 1
        self.mean += (reward - self.mean) / self.count
        return {"reward": reward, "baseline_used": baseline, "advantage": advantage, "loss": float(loss.detach())}

    def probabilities(self) -> torch.Tensor:
        """Softmax over all members (detached), for reports."""
        return torch.softmax(self._w.detach(), dim=0)

    @property
    def logits(self) -> torch.Tensor:
        return self._w.detach().clone()

    def state_dict(self) -> dict:
        return {"logits": self.logits, "optimizer": self._optimizer.state_dict(),
                "count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        logits = torch.as_tensor(state["logits"], dtype=torch.float64)
        if logits.shape != self._w.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} differs from the pool's ({self.n_members},)")
        with torch.no_grad():
            self._w.copy_(logits)
        self._optimizer.load_state_dict(state["optimizer"])
        self.count, self.mean = int(state["count"]), float(state["mean"])
