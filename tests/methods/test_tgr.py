"""TGR (METHODS.md 4.4; dfml/methods/tgr/): Fisher task embeddings of a probe, groupings of the pool, the implicit
gradient regulariser, and the method's groups in its checkpoint and members.json. Tiny tensors, CPU, seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml.methods.base import method_class
from dfml.methods.tgr.fisher import (
    dissimilarity_matrix,
    fisher_diagonal,
    fit_head,
    make_probe,
    similarity,
    similarity_matrix,
    task_embedding,
    with_fixed_batch_statistics,
)
from dfml.methods.tgr.grouping import group_members
from dfml.methods.tgr.regularizer import regularised_gradient
from dfml.models import build_model
from dfml.models.fusion import build_meta_model

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_probe(batch_stats_only: bool = True) -> nn.Module:
    torch.manual_seed(3)
    model = build_model("conv4", 3, 1, 16, width=4, batch_stats_only=batch_stats_only)
    if not batch_stats_only:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images_and_labels(n: int = 6, way: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.arange(way).repeat_interleave(n // way)


def loop_fisher(model: nn.Module, images, labels) -> dict[str, torch.Tensor]:
    """The slow reference: one backward per image, squared gradients of the backbone, averaged."""
    named = {k: p for k, p in model.named_parameters() if k.startswith("backbone.")}
    totals = {k: torch.zeros_like(p) for k, p in named.items()}
    for image, label in zip(images, labels):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            F.cross_entropy(model(image[None]), label[None]).backward()
        for k, p in named.items():
            totals[k] += p.grad ** 2
    return {k: v / len(images) for k, v in totals.items()}


# -- Fisher embeddings -------------------------------------------------------------------------------

def test_fisher_diagonal_equals_a_loop_over_images():
    model = tiny_probe(batch_stats_only=False)
    images, labels = images_and_labels()
    fast = fisher_diagonal(model, images, labels, chunk=4)  # chunks that do not divide the batch
    slow = loop_fisher(model, images, labels)
    assert fast.keys() == slow.keys() and all(k.startswith("backbone.") for k in fast)
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-10)


def test_the_probe_normalises_each_image_with_the_members_batch_statistics_and_gets_a_fitted_head():
    probe = tiny_probe()
    images, labels = images_and_labels()
    fixed = with_fixed_batch_statistics(probe, images)
    with torch.no_grad():
        torch.testing.assert_close(fixed(images), probe.train()(images), rtol=1e-4, atol=1e-5)
    probe.eval()
    assert not fixed.training and all(p.requires_grad for p in probe.parameters())  # the original untouched
    features = fixed.backbone(images).detach()
    fixed.head = fit_head(features, labels, 3)
    expected = loop_fisher(fixed, images, labels)
    embedding = task_embedding(probe, images, labels, n_way=3)
    for key in expected:
        torch.testing.assert_close(embedding[key], expected[key], rtol=1e-4, atol=1e-10)
    assert sum(float(v.sum()) for v in embedding.values()) > 0


def test_fit_head_is_deterministic_and_learns_the_labels():
    features = torch.cat([torch.randn(5, 4) + 3 * torch.eye(4)[k] for k in range(3)])
    labels = torch.arange(3).repeat_interleave(5)
    first, second = fit_head(features, labels, 3), fit_head(features, labels, 3)
    assert torch.equal(first.weight, second.weight)
    assert float((first(features).argmax(1) == labels).float().mean()) == 1.0


def test_similarity_is_one_on_identical_symmetric_scale_free_and_zero_on_disjoint_fishers():
    gen = torch.Generator().manual_seed(1)
    a = {"x": torch.rand(5, generator=gen), "y": torch.rand(2, 3, generator=gen)}
    b = {"x": torch.rand(5, generator=gen), "y": torch.rand(2, 3, generator=gen)}
    assert similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    assert similarity(a, b) == pytest.approx(similarity(b, a), abs=1e-15) and 0 < similarity(a, b) < 1
    assert similarity(a, {k: 7 * v for k, v in a.items()}) == pytest.approx(1.0, abs=1e-12)
    assert similarity({"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([0.0, 2.0])}) == pytest.approx(0.0)
    # mean over tensors, not over entries: each tensor counts once
    single = {"x": torch.tensor([1.0, 0.0]), "y": torch.ones(3)}
    other = {"x": torch.tensor([0.0, 1.0]), "y": torch.ones(3)}
    assert similarity(single, other) == pytest.approx(0.5)
    matrix = similarity_matrix([a, b, single | {"y": torch.ones(2, 3), "x": torch.ones(5)}])
    assert torch.equal(matrix, matrix.T) and torch.equal(torch.diag(matrix), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(dissimilarity_matrix([a, b]), 1 - similarity_matrix([a, b]))
    with pytest.raises(ValueError, match="embeddings of different probes"):
        similarity(a, {"x": a["x"]})


def test_probes_need_no_download_the_init_one_copies_the_meta_model_the_random_one_is_seeded():
    meta = build_meta_model([], "random", way=3, in_channels=1, image_size=16, width=4, seed=2)
    init = make_probe("init", meta, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(init.parameters(), meta.parameters()))
    assert not any(p.requires_grad for p in init.parameters()) and all(p.requires_grad for p in meta.parameters())
    state = torch.random.get_rng_state()
    first, second = make_probe("random", meta, seed=5), make_probe("random", meta, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    assert not torch.equal(next(first.parameters()), next(init.parameters()))
    with pytest.raises(ValueError, match="probe must be one of init, random, got 'resnet34'"):
        make_probe("resnet34", meta, seed=0)


# -- groupings ------------------------------------------------------------------------------------

BLOCK = np.repeat(np.arange(3), 3)  # 9 members in 3 blocks of mutually similar members


def block_similarity(noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    similar = np.where(BLOCK[:, None] == BLOCK[None, :], 0.95, 0.3)
    similar = similar + noise * np.random.default_rng(seed).standard_normal(similar.shape)
    similar = (similar + similar.T) / 2
    np.fill_diagonal(similar, 1.0)
    return torch.tensor(similar)


def within_group_dissimilarity(groups, similar) -> float:
    pairs = [(i, j) for g in groups for i in g for j in g if i < j]
    return float(np.mean([1 - float(similar[i, j]) for i, j in pairs]))


@pytest.mark.parametrize("seed", range(4))
def test_heterogeneous_groups_take_one_member_of_each_block(seed):
    groups = group_members(block_similarity(0.02, seed), 3, "heterogeneous", seed)
    assert [sorted(BLOCK[g]) for g in groups] == [[0, 1, 2]] * 3


@pytest.mark.parametrize("seed", range(4))
def test_similar_groups_recover_the_blocks(seed):
    groups = group_members(block_similarity(0.02, seed), 3, "similar", seed)
    assert sorted(groups) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.mark.parametrize("seed", range(4))
def test_tgrs_dissimilar_groups_mix_the_blocks_through_spectral_clustering_on_the_dissimilarity(seed):
    """TGR's grouping: scikit-learn's spectral clustering with 1 - similarity as the affinity. Its groups mix
    blocks far more than the similar ones, but (a degenerate relaxation) are not always one per block."""
    from sklearn.cluster import SpectralClustering

    similar = block_similarity(0.02, seed)
    groups = group_members(similar, 3, "dissimilar", seed)
    labels = SpectralClustering(n_clusters=3, affinity="precomputed", n_init=30,
                                random_state=seed).fit_predict((1 - similar).numpy())
    assert groups == [sorted(np.flatnonzero(labels == g).tolist()) for g in range(3)]
    assert within_group_dissimilarity(groups, similar) > 0.4 > \
        within_group_dissimilarity(group_members(similar, 3, "similar", seed), similar)


def test_random_groups_are_seeded_balanced_and_every_grouping_uses_every_member():
    similar = torch.eye(7, dtype=torch.float64) * 0.5 + 0.5
    first = group_members(similar, 3, "random", seed=4)
    assert first == group_members(similar, 3, "random", seed=4) != group_members(similar, 3, "random", seed=5)
    assert sorted(len(g) for g in first) == [2, 2, 3]
    for how in ("dissimilar", "heterogeneous", "similar", "random"):
        groups = group_members(block_similarity(0.02), 2, how, seed=0)
        assert sorted(i for g in groups for i in g) == list(range(9)), how  # no member cut off
    assert group_members(similar, 1, "dissimilar", 0) == [list(range(7))]
    assert group_members(similar, 7, "similar", 0) == [[i] for i in range(7)]


def test_grouping_errors_name_the_problem():
    with pytest.raises(ValueError, match="cannot split 9 members into 10 groups: groups must lie in 1..9"):
        group_members(block_similarity(), 10, "dissimilar", 0)
    with pytest.raises(ValueError, match="grouping must be one of dissimilar, heterogeneous, similar, random, got "
                                         "'kmeans'"):
        group_members(block_similarity(), 3, "kmeans", 0)
    with pytest.raises(ValueError, match=r"must be square, got shape \(2, 3\)"):
        group_members(torch.ones(2, 3), 1, "random", 0)


# -- the implicit gradient regulariser --------------------------------------------------------------

def tiny_losses(n: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(2, (5,))) for _ in range(n)]

    def loss_of(x, y):
        return lambda weights: F.cross_entropy(functional_call(model, weights, (x,)), y)

    return [loss_of(x, y) for x, y in data], params


def penalised_gradient(losses, params, weight: float) -> dict[str, torch.Tensor]:
    """grad of L_bar + weight * sum_i ||g_i - g_bar||^2, by double back-propagation."""
    leaves = list(params.values())
    grads = [torch.autograd.grad(fn(params), leaves, create_graph=True) for fn in losses]
    mean = [torch.stack(g).mean(0) for g in zip(*grads)]
    penalty = sum(((g - m) ** 2).sum() for g_i in grads for g, m in zip(g_i, mean))
    objective = torch.stack([fn(params) for fn in losses]).mean() + weight * penalty
    return dict(zip(params, torch.autograd.grad(objective, leaves)))


def distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


@pytest.mark.parametrize("through, factor", [(True, 1.0), (False, 0.5)])
def test_the_regularised_direction_is_the_gradient_of_a_variance_penalty_to_first_order(through, factor):
    """Through the displacement (the official code's create_graph): L_bar + eta/n sum ||g_i - g_bar||^2; with
    the displacement fixed: eta/(2n). The error shrinks like eta^2: a quarter when eta halves."""
    losses, params = tiny_losses()
    n = len(losses)
    plain = regularised_gradient(losses, params, 0.0, regularise=False).direction
    errors = []
    for eta in (0.05, 0.025):
        direction = regularised_gradient(losses, params, eta, through_displacement=through).direction
        expected = penalised_gradient(losses, params, factor * eta / n)
        errors.append(distance(direction, expected))
        assert errors[-1] < 0.05 * distance(expected, plain)  # the penalty's effect is much larger than the error
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.15)
    wrong = penalised_gradient(losses, params, (1.5 - factor) * 0.025 / n)  # the other expansion's weight
    assert distance(regularised_gradient(losses, params, 0.025, through_displacement=through).direction, wrong) > \
        5 * errors[1]


def test_at_eta_zero_and_without_the_regulariser_the_direction_is_the_mean_gradient():
    losses, params = tiny_losses()
    leaves = list(params.values())
    grads = [torch.autograd.grad(fn(params), leaves) for fn in losses]
    mean = {k: torch.stack(g).mean(0) for k, g in zip(params, zip(*grads))}
    plain = regularised_gradient(losses, params, 1e-3, regularise=False)
    assert all(torch.equal(plain.direction[k], mean[k]) for k in mean) and plain.gradient_variance != \
        plain.gradient_variance
    for through in (True, False):
        still = regularised_gradient(losses, params, 0.0, through_displacement=through)
        assert distance(still.direction, mean) < 1e-15
        assert still.gradient_variance > 0 and float(still.loss) == pytest.approx(float(plain.loss))


# -- the method ---------------------------------------------------------------------------------

def tgr_inputs(**method):
    from tiny_jobs import contract_inputs

    inputs = contract_inputs("tgr")
    inputs.settings["method"].update(method)
    return inputs


def test_tgr_groups_are_formed_once_checkpointed_and_reported_in_members_json(tmp_path):
    from dfml.checkpoint import load_checkpoint, save_checkpoint

    cls = method_class("tgr")
    method = cls.build(tgr_inputs(groups=2, grouping="heterogeneous"))
    first = method.step()
    assert first.values["generated"] and first.values["grouping_seconds"] > 0
    assert sorted(len(g) for g in method.groups) == [1, 2]  # 3 members, balanced
    assert method.dissimilarity.shape == (3, 3) and float(method.dissimilarity.diagonal().abs().max()) == 0
    second = method.step()
    assert second.values["grouping_seconds"] != second.values["grouping_seconds"]  # nan: grouped once only
    save_checkpoint(tmp_path / "c.safetensors", method.state_dict())
    resumed = cls.build(tgr_inputs(groups=2, grouping="heterogeneous"))
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.safetensors"))
    assert resumed.groups == method.groups and torch.equal(resumed.dissimilarity, method.dissimilarity)
    method.write_outputs(tmp_path)
    record = json.loads((tmp_path / "members.json").read_text())
    assert record["algorithm"] == "tgr" and record["selection"] == "uniform"  # the base format, keys added
    assert record["groups"]["members"] == method.groups and record["groups"]["grouping"] == "heterogeneous"
    assert [m["group"] for m in record["members"]] == [next(g for g, ms in enumerate(method.groups) if i in ms)
                                                       for i in range(3)]
    assert sum(m["draws"] for m in record["members"]) == 2 * method.events  # teachers 2 per event
    events = [log for log in (first, second) if log.values["generated"]]
    assert all(log.values["gradient_variance"] >= 0 for log in events)


def test_tgr_refuses_what_it_cannot_run():
    from dfml.meta import build_learner

    cls = method_class("tgr")
    inputs = tgr_inputs()
    inputs.learner = build_learner("anil", inner_lr=0.1)
    with pytest.raises(ValueError, match="tgr replays its memory with MAML: use learner maml or fomaml, not anil"):
        cls.build(inputs)
    with pytest.raises(ValueError, match="groups 4 exceeds the pool's 3 members: lower groups"):
        cls.build(tgr_inputs(groups=4))
    with pytest.raises(ValueError, match="grouping must be one of dissimilar, heterogeneous, similar, random"):
        cls.build(tgr_inputs(grouping="clustered"))
    with pytest.raises(ValueError, match="raise support_per_class / query_per_class to at least 2"):
        cls.build(tgr_inputs(query_per_class=1))
