import math

import pytest
import torch

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.methods.taco.reliability import ReliabilityWeights, Selection, agreement_rewards


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


def pl_step_grads(w, members, candidates):
    """d log p(m_i | m_<i) / d w_j for each draw i, by hand."""
    remaining, grads = list(candidates), []
    for m in members:
        norm = sum(math.exp(w[j]) for j in remaining)
        grad = [0.0] * len(w)
        for j in remaining:
            grad[j] -= math.exp(w[j]) / norm
        grad[m] += 1.0
        grads.append(grad)
        remaining.remove(m)
    return grads


def test_per_member_rewards_credit_each_draw_against_one_baseline():
    """One reward per drawn member: the gradient is -sum_i (R_i - b) d log p(m_i | m_<i), b the baseline before
    the event; Adam's first step moves each logit by lr * sign(gradient); all rewards enter the running mean."""
    lr = 0.1
    weights = ReliabilityWeights(4, lr=lr, baseline=50.0)
    w = [1.0] * 4
    selection, rewards = Selection([3, 1], [0, 1, 2, 3]), [80.0, 20.0]
    grads = pl_step_grads(w, selection.members, selection.candidates)
    grad = [-sum((r - 50.0) * g[j] for r, g in zip(rewards, grads)) for j in range(4)]
    info = weights.update(selection, rewards)
    assert info["advantage"] == [30.0, -30.0] and info["baseline_used"] == 50.0
    assert any(abs(g) > 1e-6 for g in grad)
    assert weights.logits.tolist() == pytest.approx([1.0 - lr * math.copysign(1.0, g) if abs(g) > 1e-12 else 1.0
                                                     for g in grad], abs=1e-6)
    assert weights.logits[3] > weights.logits[1]  # the better-rewarded draw gained on the worse one
    assert (weights.count, weights.mean) == (2, 50.0)
    with pytest.raises(ValueError, match="3 rewards for 2 drawn members"):
        weights.update(selection, [1.0, 2.0, 3.0])


def test_agreement_rewards_match_a_hand_count():
    """Two references, three drawn members. Reference 0 ranks the drawn members' distances 0.1 < 0.5 = 0.5 (member
    0 beats both, members 1 and 2 beat nobody but tie each other); reference 1 ranks 0.9 > 0.2 > 0.1."""
    distances = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.2, 0.1]])
    win_0 = [1.0, 0.25, 0.25]  # (wins + ties/2) / 2 others
    win_1 = [0.0, 0.5, 1.0]
    for weights, mix in ((torch.tensor([1.0, 1.0]), 0.5), (torch.tensor([3.0, 1.0]), 0.75)):
        expected = [100 * (mix * a + (1 - mix) * b) for a, b in zip(win_0, win_1)]
        got = agreement_rewards(distances, weights)
        assert got == pytest.approx(expected)
        assert sum(got) / 3 == pytest.approx(50.0)  # an event's rewards always average 50
    with pytest.raises(ValueError, match=r"distances must be \[references, drawn >= 2\]"):
        agreement_rewards(torch.ones(2, 1), torch.ones(2))
    with pytest.raises(ValueError, match="reference_weights must be 2 non-negative numbers"):
        agreement_rewards(distances, torch.tensor([1.0, -1.0]))
