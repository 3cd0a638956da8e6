"""TACO (dfml/methods/taco/): the reliability weights (reliability.py), task interpolation (interpolation.py) and
the feature-level learners it needs, and the method itself on tiny jobs.

The interface contract (curve fields, training, exact resume) runs for TACO in tests/methods/test_loop.py, with
every registered algorithm, and killed mid-run in tests/workflow/test_preemption.py."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.meta import Task, build_learner
from dfml.meta.learners import backbone_features, distance_logits, prototypes
from dfml.methods.base import MethodInputs, method_class
from dfml.methods.taco.interpolation import interpolated_task_loss, mix, sample_mixing_weight
from dfml.methods.taco.reliability import ReliabilityWeights, Selection, agreement_rewards
from dfml.models import build_model
from tiny_jobs import contract_inputs

# --- the reliability weights (dfml/methods/taco/reliability.py) ----------------------------------------------


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


# --- task interpolation (dfml/methods/taco/interpolation.py) and the feature-level learners -------------------

WAY, SHOT, QUERY = 3, 2, 4


def task(seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAY)
    return Task(torch.randn(WAY * SHOT, 1, 16, 16, generator=gen), labels.repeat_interleave(SHOT),
                torch.randn(WAY * QUERY, 1, 16, 16, generator=gen), labels.repeat_interleave(QUERY))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("conv4", WAY, 1, 16, width=4, batch_stats_only=True)


@pytest.mark.parametrize("name", ["protonet", "anil"])
def test_weight_zero_is_the_first_task_and_one_the_second_with_the_first_labels(model, name):
    learner = build_learner(name, **({"inner_lr": 0.1, "train_steps": 2} if name == "anil" else {}))
    params = dict(model.named_parameters())
    first, second = task(1), task(2)
    plain = learner.task_loss(model, params, first, training=True)
    mixed = interpolated_task_loss(learner, model, params, first, second, 0.0)
    assert torch.allclose(mixed[0], plain[0], atol=1e-6) and torch.equal(mixed[1], plain[1])
    relabelled = Task(second.support_x, first.support_y, second.query_x, first.query_y)
    other = learner.task_loss(model, params, relabelled, training=True)
    assert torch.allclose(interpolated_task_loss(learner, model, params, first, second, 1.0)[0], other[0], atol=1e-6)


def test_mixing_is_class_by_class_in_feature_space(model):
    learner = build_learner("protonet")
    params = dict(model.named_parameters())
    first, second = task(1), task(2)
    weight = 0.3
    f = lambda x: backbone_features(model, params, x)  # noqa: E731
    support = 0.3 * f(second.support_x) + 0.7 * f(first.support_x)  # row i of both tasks: the same class
    query = 0.3 * f(second.query_x) + 0.7 * f(first.query_x)
    expected = F.cross_entropy(distance_logits(query, prototypes(support, first.support_y, WAY)), first.query_y)
    loss, _ = interpolated_task_loss(learner, model, params, first, second, weight)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()  # differentiable into the meta-model
    assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("backbone."))
    assert torch.equal(mix(torch.zeros(2), torch.ones(2), 0.25), torch.full((2,), 0.25))


def test_mixing_weight_follows_beta_half_half_on_a_fixed_seed():
    rng = torch.Generator().manual_seed(7)
    first = sample_mixing_weight(rng)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(7)))
    assert first == float(np.random.default_rng(seed).beta(0.5, 0.5))  # the documented draw
    draws = np.array([sample_mixing_weight(rng) for _ in range(4000)])
    assert abs(draws.mean() - 0.5) < 0.02 and abs(draws.var() - 0.125) < 0.01  # Beta(0.5, 0.5): mean 1/2, var 1/8
    assert ((draws < 0.1) | (draws > 0.9)).mean() > 0.35  # U-shaped: mass at the ends (0.41 in theory)
    assert sample_mixing_weight(torch.Generator().manual_seed(7)) == first  # reproducible from the rng state


def test_maml_and_mismatched_tasks_are_refused(model):
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="mixes backbone features: learner 'maml'"):
        interpolated_task_loss(build_learner("maml"), model, params, task(1), task(2), 0.5)
    short = Task(task(2).support_x[:WAY], torch.arange(WAY), task(2).query_x, task(2).query_y)
    with pytest.raises(ValueError, match="equal shapes, support_x"):
        interpolated_task_loss(build_learner("protonet"), model, params, task(1), short, 0.5)
    with pytest.raises(ValueError, match="Beta parameter"):
        sample_mixing_weight(torch.Generator(), alpha=0)


# --- the method on tiny jobs ----------------------------------------------------------------------------------


class Recording(torch.nn.Module):
    """A pool member that notes the batches it answers without gradient (teacher calls, not recovery steps)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.teacher_calls = model, []

    def forward(self, images):
        if not torch.is_grad_enabled():
            self.teacher_calls.append(images.detach().clone())
        return self.model(images)


def test_taco_distils_each_new_task_from_its_own_member():
    """METHODS 4.2: the official code distils all four new tasks from the last sampled member."""
    inputs = contract_inputs("taco")
    for member in inputs.pool:
        member.model = Recording(member.model)
    inputs.settings["metatrain"]["meta_batch"] = 4
    method = method_class("taco").build(inputs)
    drawn = torch.randint(len(inputs.pool), (4,), generator=torch.Generator().manual_seed(inputs.seed)).tolist()
    assert len(set(drawn)) > 1  # the seed draws several members, so the bug would show
    method.step()
    for index, member in enumerate(inputs.pool):
        assert len(member.model.teacher_calls) == drawn.count(index), index
    for index in set(drawn):  # each member was asked about the queries recovered from itself
        member = inputs.pool[index]
        stored = torch.cat([method.memory.images(name, "query") for name in member.qualified_classes
                            if name in method.memory.classes("query")])
        for call in member.model.teacher_calls:
            assert all(bool((stored == row).flatten(1).all(1).any()) for row in call)


def taco_with(**method) -> MethodInputs:
    inputs = contract_inputs("taco")
    inputs.settings["method"].update(method)
    return inputs


def test_taco_reliability_weights_learn_resume_exactly_and_say_which_members_were_drawn(tmp_path):
    """The data-free pseudo reward: weights, REINFORCE baseline and draw counts survive a checkpoint, and
    members.json reports them (probabilities of the whole pool, draws per member, data-free)."""
    cls = method_class("taco")
    reference = cls.build(taco_with(selection="reliability", reward="pseudo"))
    logs = [reference.step() for _ in range(4)]
    assert reference.weights.count == 2 * reference.events  # one reward per drawn member
    assert not torch.equal(reference.weights.logits, torch.ones(3, dtype=torch.float64))
    assert all(math.isnan(log.values["reward"]) != log.values["generated"] for log in logs)

    first = cls.build(taco_with(selection="reliability", reward="pseudo"))
    first.step(), first.step()
    save_checkpoint(tmp_path / "c.safetensors", first.state_dict())
    resumed = cls.build(taco_with(selection="reliability", reward="pseudo"))
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.safetensors"))
    for expected in logs[2:]:
        log = resumed.step()
        assert (log.meta_loss, log.values["reward"] == log.values["reward"]) == (
            expected.meta_loss, expected.values["reward"] == expected.values["reward"])
    assert torch.equal(resumed.weights.logits, reference.weights.logits)
    assert (resumed.weights.count, resumed.weights.mean) == (reference.weights.count, reference.weights.mean)
    assert resumed.draws == reference.draws and sum(reference.draws) == 2 * reference.events

    reference.write_outputs(tmp_path)
    record = json.loads((tmp_path / "members.json").read_text())
    assert (record["selection"], record["reward"], record["data_free"]) == ("reliability", "pseudo", True)
    assert [m["card"] for m in record["members"]] == ["member_0.json", "member_1.json", "member_2.json"]
    assert [m["draws"] for m in record["members"]] == reference.draws
    assert sum(m["probability"] for m in record["members"]) == pytest.approx(1.0, abs=1e-5)
    assert [m["logit"] for m in record["members"]] == pytest.approx(reference.weights.logits.tolist(), abs=1e-6)


def test_taco_uniform_members_are_reported_as_such():
    method = method_class("taco").build(contract_inputs("taco"))
    method.step()
    usage = method.member_usage()
    assert method.weights is None and usage["selection"] == "uniform" and usage["reward"] is None
    assert usage["probabilities"] == [1 / 3] * 3 and sum(method.draws) == 2  # meta_batch draws, with replacement


def test_taco_settings_that_read_real_meta_val_episodes_are_not_data_free():
    cls = method_class("taco")
    assert not cls.reads_metaval({"selection": "uniform", "reward": "metaval"})  # no weights: no reward read
    assert not cls.reads_metaval({"selection": "reliability", "reward": "pseudo"})
    assert cls.reads_metaval({"selection": "reliability", "reward": "metaval"})
    assert cls.reads_metaval({"trigger": "metaval"})
    with pytest.raises(ValueError, match="reward/trigger metaval reads real meta-val episodes: none were handed"):
        cls.build(taco_with(selection="reliability", reward="metaval"))
    with pytest.raises(ValueError, match="reward pseudo asks the members not drawn about the 3 drawn ones: the pool "
                                         "needs more than 3 members, it has 3"):
        inputs = taco_with(selection="reliability", reward="pseudo")
        inputs.settings["metatrain"]["meta_batch"] = 3
        cls.build(inputs)
    with pytest.raises(ValueError, match="selection reliability draws 4 distinct members"):
        inputs = taco_with(selection="reliability")
        inputs.settings["metatrain"]["meta_batch"] = 4
        cls.build(inputs)
    with pytest.raises(ValueError, match="reward must be one of pseudo, metaval, got 'acc'"):
        cls.build(taco_with(reward="acc"))
