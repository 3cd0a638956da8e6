"""The zero-order gradient estimator and black-box access (dfml/inversion/zeroorder.py, dfml/models/access.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dfml.inversion.zeroorder import sphere_directions, zero_order_gradient
from dfml.models.access import AccessError, BlackBoxAPI, check_access, total_queries

SHAPE = (1, 8, 8)  # d = 64
D = math.prod(SHAPE)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * D, 5)).double().eval()


def per_image_ce(model, labels):
    return lambda images, rows: F.cross_entropy(model(images), labels[rows], reduction="none")


def true_gradients(model, x, labels):
    x = x.clone().requires_grad_()
    F.cross_entropy(model(x), labels, reduction="sum").backward()  # per-image losses: row i's gradient is x_i's
    return x.grad


def mean_cosine(estimate, truth):
    return float(F.cosine_similarity(estimate.flatten(1), truth.flatten(1), dim=1).mean())


def test_directions_are_unit_and_isotropic():
    u = sphere_directions(200, 50, SHAPE, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert u.shape == (200, 50, *SHAPE)
    assert torch.allclose(u.flatten(2).norm(dim=-1), torch.ones(200, 50, dtype=torch.float64))
    second_moment = (u.flatten(2) ** 2).mean(dim=(0, 1))  # E[u_k^2] = 1/d for every coordinate
    assert torch.allclose(second_moment, torch.full((D,), 1 / D, dtype=torch.float64), rtol=0.1)


def test_cosine_to_the_true_gradient_rises_with_q_as_theory_says():
    # For a locally linear loss, E cos(g_hat, g) ~= sqrt(q / (d + q - 1)) (the estimate projects g onto q random
    # directions). With mu = 0.005 the loss is linear to ~1e-3 relative; averaged over 64 images the Monte-Carlo
    # spread of the mean cosine is ~0.01, so +-0.06 around theory cannot pass by luck and catches a wrong scaling,
    # a biased direction law or a mixed-up image/direction axis (those give cosines near 0 or far below theory).
    model = tiny_model()
    x = torch.randn(64, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))
    truth = true_gradients(model, x, labels)
    cosines = []
    for q in (4, 16, 64, 256):
        estimate = zero_order_gradient(per_image_ce(model, labels), x, q=q, mu=0.005,
                                       rng=torch.Generator().manual_seed(q))
        cosines.append(mean_cosine(estimate, truth))
        assert cosines[-1] == pytest.approx(math.sqrt(q / (D + q - 1)), abs=0.06), (q, cosines)
    assert cosines == sorted(cosines)
    assert cosines[-1] > 0.85  # q = 4d: the estimate points where the gradient does


def test_estimate_is_unbiased_in_scale():
    # (d/q) * sum_j (g . u_j) u_j has expectation g: averaging many estimates recovers the gradient itself,
    # norm included (a missing d/q factor, here 4, or a mu in the wrong place fails here).
    model = tiny_model()
    x = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    truth = true_gradients(model, x, labels)
    rng = torch.Generator().manual_seed(4)
    mean = sum(zero_order_gradient(per_image_ce(model, labels), x, q=16, mu=0.005, rng=rng) for _ in range(400)) / 400
    assert mean_cosine(mean, truth) > 0.98
    ratio = mean.flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(4, dtype=torch.float64), atol=0.1)


def test_queries_are_batched_over_directions_and_counted():
    model = tiny_model().float()
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    labels = torch.arange(10) % 5
    calls = []

    def loss_fn(images, rows):
        calls.append(images.shape[0])
        return F.cross_entropy(api(images), labels[rows], reduction="none")

    x = torch.randn(10, *SHAPE)
    zero_order_gradient(loss_fn, x, q=8, mu=0.005, rng=torch.Generator().manual_seed(0), max_batch=24)
    assert calls == [10, 24, 24, 24, 8]  # the base losses, then 3 images x 8 directions per call
    assert api.queries == 10 * (8 + 1)
    base = loss_fn(x, torch.arange(10))
    calls.clear()
    zero_order_gradient(loss_fn, x, q=8, mu=0.005, rng=torch.Generator().manual_seed(0), base_loss=base)
    assert calls == [80] and api.queries == 10 * 9 + 10 + 80  # a given base loss costs no query


def test_estimator_refuses_bad_arguments():
    model = tiny_model()
    loss = per_image_ce(model, torch.zeros(2, dtype=torch.long))
    x = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="q >= 1 directions and a step mu > 0"):
        zero_order_gradient(loss, x, q=0, mu=0.005, rng=torch.Generator())
    with pytest.raises(ValueError, match=r"images \[n, C, H, W\]"):
        zero_order_gradient(loss, x[0], q=4, mu=0.005, rng=torch.Generator())
    with pytest.raises(ValueError, match="one loss per image"):
        zero_order_gradient(lambda images, rows: model(images).sum(), x, q=4, mu=0.005, rng=torch.Generator())


def test_black_box_api_has_no_parameters_and_no_gradient():
    model = tiny_model().float()
    api = BlackBoxAPI.from_model(model, ["a", "b", "c", "d", "e"], "toy")
    images = torch.randn(3, *SHAPE, requires_grad=True)
    logits = api(images)
    assert torch.equal(logits, model(images).detach())
    assert not logits.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        logits.sum().backward()
    for name in ("parameters", "named_parameters", "state_dict", "modules", "model", "weight"):
        assert not hasattr(api, name), name
    with pytest.raises(AttributeError):
        api.model = model  # no attribute can be attached to reach the member
    assert api.queries == 3 and total_queries([api, api]) == 6 and api.seconds > 0
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        api(images[0])


def test_access_rules():
    check_access("ss", "white_box", "bidfmkd", "black_box")  # a black-box method on a white-box pool: fine
    check_access("ss", "black_box", "bidfmkd", "black_box")
    with pytest.raises(AccessError, match="scenario 'api_ss' exposes its pool as black-box APIs.*method 'purer' needs"):
        check_access("api_ss", "black_box", "purer", "white_box")
    with pytest.raises(AccessError, match="scenario access must be one of"):
        check_access("ss", "grey_box", "purer", "white_box")
