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

The reward is one number for the whole selection (TACO's published reward: the mean accuracy, in %, of the
updated meta-model on real meta-val episodes, which is not data-free), or one number per drawn member: then
member i's term is ``-(R_i - b) * log p(m_i | the members drawn before it)`` and all k rewards enter the running
mean. :func:`agreement_rewards` is such a per-member reward computed on recovered data only (``reward: pseudo``).
All randomness comes from the ``torch.Generator`` passed to :meth:`ReliabilityWeights.sample`, and
:meth:`ReliabilityWeights.state_dict` holds only tensors and numbers (for :mod:`dfml.checkpoint`),
so a resumed run draws and updates exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

    def step_log_probabilities(self, selection: Selection) -> list[torch.Tensor]:
        """log p(m_i | m_1..m_{i-1}) for each drawn member, in draw order; differentiable w.r.t. the logits."""
        remaining = list(selection.candidates)
        if len(set(selection.members)) != len(selection.members) or not set(selection.members) <= set(remaining):
            raise ValueError(f"selection members {selection.members} must be distinct candidates {remaining}")
        terms = []
        for member in selection.members:
            terms.append(self._w[member] - torch.logsumexp(self._w[remaining], dim=0))
            remaining.remove(member)
        return terms

    def log_probability(self, selection: Selection) -> torch.Tensor:
        """Plackett-Luce log-probability of the drawn sequence; differentiable w.r.t. the logits."""
        return torch.stack(self.step_log_probabilities(selection)).sum()

    def update(self, selection: Selection, reward: float | Sequence[float]) -> dict:
        """One Adam step on ``-(R - b) * log p(selection)`` (one reward) or ``-sum_i (R_i - b) log p(m_i | ...)``
        (one reward per drawn member, in draw order); then the baseline includes the reward(s)."""
        rewards = [float(r) for r in (reward if isinstance(reward, Sequence) else [reward])]
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(f"rewards must be finite, got {rewards!r}")
        if len(rewards) not in (1, len(selection.members)):
            raise ValueError(f"{len(rewards)} rewards for {len(selection.members)} drawn members: give one for the "
                             "selection or one per member")
        baseline = self.initial_baseline if self.count == 0 else self.mean
        if len(rewards) == 1 and not isinstance(reward, Sequence):
            loss = -(rewards[0] - baseline) * self.log_probability(selection)
        else:
            terms = self.step_log_probabilities(selection)
            loss = -sum((r - baseline) * term for r, term in zip(rewards, terms))
        self._optimizer.zero_grad()
        loss.backward()
        self._optimizer.step()
        for r in rewards:
            self.count += 1
            self.mean += (r - self.mean) / self.count
        advantages = [r - baseline for r in rewards]
        return {"reward": rewards[0] if len(advantages) == 1 else rewards, "baseline_used": baseline,
                "advantage": advantages[0] if len(advantages) == 1 else advantages, "loss": float(loss.detach())}

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


def agreement_rewards(distances: torch.Tensor, reference_weights: torch.Tensor) -> list[float]:
    """``reward: pseudo``: per drawn member, how in-domain the other members find its recovered images, in %.

    ``distances[j, i]``: the BN-statistics distance of member i's recovered images under reference member j
    (the members not drawn at this event): how far their feature statistics are from what j saw in training.
    Per reference, member i wins against each other drawn member i' whose images j finds farther (ties half);
    the reward is the win rate averaged over references weighted by ``reference_weights`` (their current
    reliability probabilities, so trusted references count more), times 100. Members honestly trained on the
    scenario's data recover images whose statistics the other honest members recognise; an untrained member or
    one trained on another dataset does not. Ranks, not raw distances: the references' scales differ. The k
    rewards of an event always average 50, so only the members' differences drive the update."""
    if distances.ndim != 2 or distances.shape[1] < 2:
        raise ValueError(f"distances must be [references, drawn >= 2], got {tuple(distances.shape)}")
    if reference_weights.shape != distances.shape[:1] or not bool((reference_weights >= 0).all()):
        raise ValueError(f"reference_weights must be {distances.shape[0]} non-negative numbers")
    d = distances.double()
    farther = (d.unsqueeze(1) > d.unsqueeze(2)).double() + 0.5 * (d.unsqueeze(1) == d.unsqueeze(2)).double()
    k = d.shape[1]
    wins = (farther.sum(2) - 0.5) / (k - 1)  # [refs, drawn]; the diagonal tie counts 0.5, removed
    weights = reference_weights.double() / reference_weights.double().sum()
    return (100 * (weights.unsqueeze(1) * wins).sum(0)).tolist()
