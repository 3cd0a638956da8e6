import math

import pytest
import torch

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.methods.reliability import ReliabilityWeights, Selection


def with_logits(values, **kwargs) -> ReliabilityWeights:
    weights = ReliabilityWeights(len(values), **kwargs)
    state = weights.state_dict()
    state["logits"] = torch.tensor(values, dtype=torch.float64)
    weights.load_state_dict(state)
    return weights


def pl_log_prob(w, members, candidates):
    remaining, total = list(candidates), 0.0
    for m in members:
        total += w[m] - math.log(sum(math.exp(w[j]) for j in remaining))
        remaining.remove(m)
    return total


def pl_grad(w, members, candidates):
    """d log p / d w_j of the Plackett-Luce sequence probability, by hand."""
    remaining, grad = list(candidates), [0.0] * len(w)
    for m in members:
        norm = sum(math.exp(w[j]) for j in remaining)
        for j in remaining:
            grad[j] -= math.exp(w[j]) / norm
        grad[m] += 1.0
        remaining.remove(m)
    return grad


def test_log_probability_matches_hand_computation():
    w = [0.5, -1.0, 2.0, 0.0, 1.5]
    weights = with_logits(w)
    selection = Selection(members=[2, 0], candidates=[0, 2, 3, 4])
    expected = (2.0 - math.log(math.exp(0.5) + math.exp(2.0) + math.exp(0.0) + math.exp(1.5))
                + 0.5 - math.log(math.exp(0.5) + math.exp(0.0) + math.exp(1.5)))
    got = weights.log_probability(selection)
    assert got.requires_grad
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert got.item() == pytest.approx(pl_log_prob(w, [2, 0], [0, 2, 3, 4]), abs=1e-12)
    with pytest.raises(ValueError, match="distinct candidates"):
        weights.log_probability(Selection(members=[1], candidates=[0, 2, 3, 4]))


def test_update_matches_hand_adam_and_running_baseline():
    lr, beta1, beta2, eps = 0.1, 0.9, 0.999, 1e-8
    weights = ReliabilityWeights(4, lr=lr)
    assert torch.equal(weights.logits, torch.ones(4, dtype=torch.float64))
    w = [1.0] * 4
    m, v = [0.0] * 4, [0.0] * 4
    steps = [(Selection([2, 0], [0, 1, 2, 3]), 70.0, 40.0), (Selection([1], [0, 1, 2, 3]), 10.0, 70.0)]
    for t, (selection, reward, baseline) in enumerate(steps, start=1):
        grad = [-(reward - baseline) * g for g in pl_grad(w, selection.members, selection.candidates)]
        log_p = pl_log_prob(w, selection.members, selection.candidates)
        for j in range(4):
            m[j] = beta1 * m[j] + (1 - beta1) * grad[j]
            v[j] = beta2 * v[j] + (1 - beta2) * grad[j] ** 2
            w[j] -= lr * (m[j] / (1 - beta1 ** t)) / (math.sqrt(v[j] / (1 - beta2 ** t)) + eps)
        info = weights.update(selection, reward)
        assert info["baseline_used"] == baseline
        assert info["advantage"] == reward - baseline
        assert info["loss"] == pytest.approx(-(reward - baseline) * log_p, abs=1e-9)
        assert torch.allclose(weights.logits, torch.tensor(w, dtype=torch.float64), atol=1e-6, rtol=0)
        if t == 1:  # first Adam step: -lr * sign(g)
            assert torch.allclose(weights.logits, torch.tensor([1.1, 0.9, 1.1, 0.9], dtype=torch.float64), atol=1e-6)
    assert weights.mean == pytest.approx(40.0) and weights.count == 2
    with pytest.raises(ValueError, match="finite"):
        weights.update(steps[0][0], float("nan"))


def test_rewarded_member_gains_probability():
    weights = ReliabilityWeights(4)
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        selection = weights.sample(1, rng)
        weights.update(selection, 100.0 if selection.members == [0] else 0.0)
    probs = weights.probabilities()
    assert int(probs.argmax()) == 0 and probs[0] > 0.5
    assert probs.sum().item() == pytest.approx(1.0)


def test_sampling_without_replacement_deterministic_and_softmax_frequencies():
    weights = ReliabilityWeights(6)
    rng = torch.Generator().manual_seed(1)
    for _ in range(50):
        selection = weights.sample(6, rng)
        assert sorted(selection.members) == list(range(6))
    draws = [weights.sample(3, torch.Generator().manual_seed(7)).members for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) == 3

    weights = with_logits([0.0, 1.0, 2.0])
    rng = torch.Generator().manual_seed(2)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[weights.sample(1, rng).members[0]] += 1
    assert torch.allclose(counts / 4000, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.03)
    with pytest.raises(ValueError, match="k must be"):
        weights.sample(0, rng)


def test_candidate_subset():
    weights = ReliabilityWeights(6, candidate_size=3)
    rng = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    for _ in range(3000):
        selection = weights.sample(2, rng)
        assert len(selection.candidates) == 3 and selection.candidates == sorted(set(selection.candidates))
        assert set(selection.members) <= set(selection.candidates) and len(set(selection.members)) == 2
        counts[selection.candidates] += 1
    assert torch.allclose(counts / 3000, torch.full((6,), 0.5), atol=0.04)
    with pytest.raises(ValueError, match="number of candidates"):
        weights.sample(4, rng)
    assert len(ReliabilityWeights(3, candidate_size=10).sample(3, rng).candidates) == 3
    for bad in ({"n_members": 0}, {"n_members": 3, "lr": 0.0}, {"n_members": 3, "candidate_size": 0}):
        with pytest.raises(ValueError):
            ReliabilityWeights(**bad)


def test_exact_resume_through_checkpoint(tmp_path):
    def rounds(weights, rng, n):
        for _ in range(n):
            selection = weights.sample(2, rng)
            weights.update(selection, 10.0 * sum(selection.members))

    reference = ReliabilityWeights(6, candidate_size=4)
    rng = torch.Generator().manual_seed(4)
    rounds(reference, rng, 5)
    save_checkpoint(tmp_path / "ckpt.safetensors", {"weights": reference.state_dict(), "rng": rng.get_state()})
    rounds(reference, rng, 5)

    state = load_checkpoint(tmp_path / "ckpt.safetensors")
    resumed = ReliabilityWeights(6, candidate_size=4)
    resumed.load_state_dict(state["weights"])
    resumed_rng = torch.Generator()
    resumed_rng.set_state(state["rng"])
    rounds(resumed, resumed_rng, 5)
    assert torch.equal(resumed.logits, reference.logits)
    assert (resumed.count, resumed.mean) == (reference.count, reference.mean)
