"""Task interpolation (dfml/methods/taco/interpolation.py) and the feature-level learners it needs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfml.meta import Task, build_learner
from dfml.methods.taco.interpolation import interpolated_task_loss, mix, sample_mixing_weight
from dfml.meta.learners import backbone_features, distance_logits, prototypes
from dfml.models import build_model

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
