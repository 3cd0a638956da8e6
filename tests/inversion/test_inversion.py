"""Tests of dfml.inversion: loss terms, pseudo dataset, batched vs sequential pool loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dfml.inversion import (
    BNStatisticsRecorder,
    InversionEngine,
    InversionWeights,
    PseudoDataset,
    bn_statistics_loss,
    jitter,
    l2_prior,
    total_variation,
)

IMAGE_SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: one thread is far faster on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- tiny teachers with the FewShotNet structure (backbone + linear head) -------------


class TinyNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TinyBNNet(TinyNet):
    def __init__(self, num_classes: int = 3, channels: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels, num_classes)


class TinyNoBNNet(TinyNet):
    def __init__(self, num_classes: int = 3, channels: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(channels, num_classes)


def randomise_running_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BN layer distinct running statistics, as a trained teacher would have."""
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def seeded_model(factory, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_running_stats(factory(**kwargs), torch.Generator().manual_seed(seed))


def mixed_pool() -> list[tuple[nn.Module, list[str]]]:
    """Two BN architecture groups, a BN-free group, a 2-class singleton; overlapping, unsorted."""
    return [
        (seeded_model(TinyBNNet, 0), ["c", "a", "b"]),
        (seeded_model(TinyBNNet, 1), ["d", "e", "f"]),
        (seeded_model(TinyBNNet, 2), ["f", "g", "a"]),
        (seeded_model(TinyBNNet, 3), ["h", "c", "i"]),
        (seeded_model(TinyBNNet, 4, channels=6), ["a", "b", "g"]),
        (seeded_model(TinyBNNet, 5, channels=6), ["i", "h", "e"]),
        (seeded_model(TinyNoBNNet, 6), ["b", "d", "c"]),
        (seeded_model(TinyNoBNNet, 7), ["g", "f", "e"]),
        (seeded_model(TinyBNNet, 8, num_classes=2), ["i", "a"]),
    ]


def pseudo_for(pool, slots: int = 4, seed: int = 0, image_shape=IMAGE_SHAPE) -> PseudoDataset:
    return PseudoDataset.for_pool(
        [classes for _, classes in pool], image_shape, shots=1, queries=slots - 1, seed=seed
    )


def loss_and_grad(engine: InversionEngine, images: torch.Tensor, seed: int = 7):
    images = images.detach().clone().requires_grad_(True)
    total, terms = engine.loss(images, torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(total, images)
    return total.detach(), terms, grad


def assert_paths_agree(pool, pseudo: PseudoDataset, weights: InversionWeights) -> None:
    batched = InversionEngine(pool, pseudo, weights, mode="batched")
    sequential = InversionEngine(pool, pseudo, weights, mode="sequential")
    assert batched.batched_groups, "the pool should contain at least one batched group"
    total_b, terms_b, grad_b = loss_and_grad(batched, pseudo.images)
    total_s, terms_s, grad_s = loss_and_grad(sequential, pseudo.images)
    torch.testing.assert_close(total_b, total_s, atol=1e-5, rtol=1e-6)
    for name in ("ce", "bn", "tv", "l2", "total"):
        torch.testing.assert_close(terms_b[name], terms_s[name], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad_b, grad_s, atol=1e-5, rtol=1e-6)
    assert grad_s.abs().sum() > 0


# -- loss terms ---------------------------------------------------------------------


def test_weights_defaults_match_purer():
    w = InversionWeights()
    assert (w.ce, w.bn, w.first_bn_multiplier, w.tv, w.l2, w.jitter, w.flip) == (
        1.0, 0.01, 1.0, 1e-4, 1e-5, 2, False,
    )


def test_total_variation_of_constant_image_is_zero():
    assert total_variation(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0


def test_total_variation_hand_value():
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).reshape(1, 1, 2, 2)
    # horizontal (1, 2), vertical (2, 3), diagonal (4), anti-diagonal (2 - 1 = 1)
    expected = math.sqrt(5) + math.sqrt(13) + 4 + 1
    assert total_variation(x).item() == pytest.approx(expected, rel=1e-6)


def test_l2_prior_hand_value():
    assert l2_prior(torch.tensor([[3.0], [4.0]])).item() == pytest.approx(5.0)
    assert l2_prior(torch.ones(2, 1, 2, 2)).item() == pytest.approx(math.sqrt(8))


def test_jitter_with_zero_shift_is_identity():
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(jitter(x, 0, torch.Generator().manual_seed(0)), x)


def test_jitter_is_one_circular_roll_for_the_whole_batch():
    x = torch.randn(5, 2, 3, 6, 6)
    out = jitter(x, 2, torch.Generator().manual_seed(3))
    matches = [
        (dh, dw)
        for dh in range(-2, 3)
        for dw in range(-2, 3)
        if torch.equal(out, torch.roll(x, (dh, dw), dims=(-2, -1)))
    ]
    assert len(matches) == 1
    again = jitter(x, 2, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_jitter_flip_mirrors_width():
    x = torch.randn(2, 3, 4, 4)
    outs = [jitter(x, 0, torch.Generator().manual_seed(s), flip=True) for s in range(20)]
    assert any(torch.equal(o, x.flip(-1)) for o in outs)
    assert any(torch.equal(o, x) for o in outs)


def single_bn_model() -> tuple[nn.Module, nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    return nn.Sequential(conv, bn, nn.ReLU()).eval(), conv, bn


def test_bn_term_is_zero_when_batch_statistics_equal_running_ones():
    model, conv, bn = single_bn_model()
    x = torch.randn(6, 3, 5, 5)
    with torch.no_grad():
        features = conv(x)
        bn.running_mean.copy_(features.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(features.var(dim=(0, 2, 3), unbiased=False))
    _, bn_loss = bn_statistics_loss(model, x)
    assert bn_loss.item() == pytest.approx(0.0, abs=1e-6)


def test_bn_term_is_unsquared_norm_of_mean_and_var_gaps():
    model, conv, bn = single_bn_model()
    x = torch.randn(6, 3, 5, 5)
    mean_gap, var_gap = torch.tensor([0.3, 0.0, -0.4, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    with torch.no_grad():
        features = conv(x)
        bn.running_mean.copy_(features.mean(dim=(0, 2, 3)) + mean_gap)
        bn.running_var.copy_(features.var(dim=(0, 2, 3), unbiased=False) + var_gap)
    _, bn_loss = bn_statistics_loss(model, x, first_bn_multiplier=3.0)
    assert bn_loss.item() == pytest.approx(3.0 * (0.5 + 1.0), rel=1e-4)


def test_hooks_are_registered_once_per_teacher():
    pool = mixed_pool()
    pseudo = pseudo_for(pool)
    engines = [InversionEngine(pool, pseudo, mode=mode) for mode in ("batched", "sequential")] * 2
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for engine in engines:
            engine.loss(pseudo.images, generator)
    for model, _ in pool:
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert len(layer._forward_pre_hooks) == 1
    # Outside a recorded call the hooks are inert: plain forward passes keep working.
    model = pool[0][0]
    model(torch.randn(2, *IMAGE_SHAPE))
    recorder = BNStatisticsRecorder.for_model(model)
    with recorder.record() as terms:
        model(torch.randn(2, *IMAGE_SHAPE))
    assert len(terms) == recorder.num_layers == 2


def test_deep_copied_teacher_records_only_its_own_statistics():
    original = seeded_model(TinyBNNet, 0)
    x = torch.randn(4, *IMAGE_SHAPE)
    _, expected = bn_statistics_loss(original, x)
    clone = copy.deepcopy(original)  # carries copies of the original's hooks
    _, from_clone = bn_statistics_loss(clone, x)
    recorder = BNStatisticsRecorder.for_model(original)
    with recorder.record() as terms:
        clone(x)
    assert terms == []
    torch.testing.assert_close(from_clone, expected)


# -- pseudo dataset -----------------------------------------------------------------


def test_pseudo_dataset_layout_and_seeded_init():
    pseudo = PseudoDataset.for_pool(
        [["b", "a"], ["c", "a"]], IMAGE_SHAPE, shots=1, queries=2, seed=5
    )
    assert pseudo.class_names == ["a", "b", "c"]
    assert tuple(pseudo.images.shape) == (3, 3, *IMAGE_SHAPE)
    assert isinstance(pseudo.images, nn.Parameter)
    same = PseudoDataset(["c", "b", "a"], 3, IMAGE_SHAPE, seed=5)
    assert torch.equal(same.images, pseudo.images)
    assert pseudo.images.std().item() == pytest.approx(1.0, abs=0.15)
    assert isinstance(pseudo.optimizer, torch.optim.Adam)
    assert pseudo.optimizer.param_groups[0]["lr"] == 0.25


def test_member_view_targets_follow_member_head_order():
    pseudo = PseudoDataset(["a", "b", "c"], 2, IMAGE_SHAPE)
    images, targets = pseudo.member_view(["c", "a"])
    assert targets.tolist() == [0, 0, 1, 1]
    assert torch.equal(images[:2], pseudo.class_images("c"))
    assert torch.equal(images[2:], pseudo.class_images("a"))
    with pytest.raises(KeyError):
        pseudo.member_view(["z"])


def test_unsorted_member_gets_its_own_labels():
    """A teacher mapping class "b" to index 0 must see target 0 on b's slots (METHODS 2.7)."""
    pseudo = PseudoDataset(["a", "b"], 3, IMAGE_SHAPE)
    with torch.no_grad():
        pseudo.images[0].fill_(-1.0)  # class "a"
        pseudo.images[1].fill_(1.0)  # class "b"
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        teacher[2].weight.copy_(torch.tensor([[10.0] * 3, [-10.0] * 3]))  # b -> 0, a -> 1
        teacher[2].bias.zero_()
    engine = InversionEngine([(teacher, ["b", "a"])], pseudo, mode="sequential")
    _, terms = engine.loss(pseudo.images)
    assert terms["ce"].item() < 1e-6
    _, targets = pseudo.member_view(["b", "a"])
    assert targets[:3].tolist() == [0, 0, 0]


def test_overlapping_members_both_push_gradient_into_shared_class():
    pool = [
        (seeded_model(TinyBNNet, 0), ["a", "b", "c"]),
        (seeded_model(TinyBNNet, 1), ["d", "c", "e"]),
    ]
    pseudo = pseudo_for(pool)
    shared = pseudo.class_names.index("c")
    weights = InversionWeights(jitter=0)
    alone = [InversionEngine([member], pseudo, weights, mode="sequential") for member in pool]
    grads = [loss_and_grad(engine, pseudo.images)[2] for engine in alone]
    assert all(g[shared].abs().sum() > 0 for g in grads)
    for mode in ("sequential", "batched"):
        _, _, both = loss_and_grad(InversionEngine(pool, pseudo, weights, mode=mode), pseudo.images)
        expected = grads[0][shared] + grads[1][shared]
        torch.testing.assert_close(both[shared], expected, atol=1e-6, rtol=1e-5)


def test_pseudo_state_dict_round_trip_includes_optimizer():
    pseudo = PseudoDataset(["a", "b"], 2, IMAGE_SHAPE, seed=1)
    pseudo.images.sum().backward()
    pseudo.optimizer.step()
    state = pseudo.state_dict()
    restored = PseudoDataset(["a", "b"], 2, IMAGE_SHAPE, seed=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.images, pseudo.images)
    assert restored.optimizer.state[restored.images]["exp_avg"].abs().sum() > 0
    with pytest.raises(ValueError):
        PseudoDataset(["a", "c"], 2, IMAGE_SHAPE).load_state_dict(state)


def test_pseudo_save_load_safetensors(tmp_path):
    pseudo = PseudoDataset(["b", "a", "c"], 2, IMAGE_SHAPE, seed=3, lr=0.1)
    pseudo.images.pow(2).sum().backward()
    pseudo.optimizer.step()
    path = tmp_path / "pseudo.safetensors"
    pseudo.save(path)
    loaded = PseudoDataset.load(path)
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.slots_per_class == 2 and loaded.lr == 0.1
    assert torch.equal(loaded.images, pseudo.images)
    # Identical next step shows the Adam moments and step count came back too.
    for p in (pseudo, loaded):
        p.optimizer.zero_grad()
        p.images.pow(2).sum().backward()
        p.optimizer.step()
    torch.testing.assert_close(loaded.images, pseudo.images)
    relearn = PseudoDataset.load(path, lr=0.25)
    assert relearn.lr == 0.25 and relearn.optimizer.param_groups[0]["lr"] == 0.25


def test_saving_a_pseudo_dataset_twice_writes_the_same_bytes(tmp_path):
    # DVC hashes files: equal pseudo datasets must be equal files (safetensors alone orders metadata at random).
    pseudo = PseudoDataset(["b", "a", "c"], 2, IMAGE_SHAPE, seed=3, lr=0.1)
    pseudo.images.pow(2).sum().backward()
    pseudo.optimizer.step()
    for name in ("one", "two", "three"):
        pseudo.save(tmp_path / f"{name}.safetensors")
    first = (tmp_path / "one.safetensors").read_bytes()
    assert first == (tmp_path / "two.safetensors").read_bytes() == (tmp_path / "three.safetensors").read_bytes()


# -- pool engine --------------------------------------------------------------------


def test_batched_matches_sequential_on_a_homogeneous_pool():
    pool = [(seeded_model(TinyBNNet, s), classes) for s, classes in
            enumerate([["a", "b", "c"], ["f", "e", "d"], ["g", "a", "h"], ["c", "i", "d"]])]
    assert_paths_agree(pool, pseudo_for(pool), InversionWeights())


def test_batched_matches_sequential_on_a_mixed_pool():
    pool = mixed_pool()
    pseudo = pseudo_for(pool)
    engine = InversionEngine(pool, pseudo, mode="batched")
    assert sorted(len(g.member_ids) for g in engine.batched_groups) == [2, 2, 4]
    assert engine.ungrouped_ids == [8]  # the 2-class member has no partner
    assert_paths_agree(pool, pseudo, InversionWeights(first_bn_multiplier=10.0, flip=True))


def test_pool_total_is_equal_weight_sum_of_members():
    pool = mixed_pool()
    pseudo = pseudo_for(pool)
    weights = InversionWeights(jitter=0)
    total, terms = InversionEngine(pool, pseudo, weights, mode="sequential").loss(pseudo.images)
    singles = [
        InversionEngine([member], pseudo, weights, mode="sequential").loss(pseudo.images)[0]
        for member in pool
    ]
    torch.testing.assert_close(terms["total"], torch.stack(singles).detach())
    torch.testing.assert_close(total, torch.stack(singles).sum())
    assert all(t.shape == (len(pool),) and not t.requires_grad for t in terms.values())
    bn_free = [i for i, (m, _) in enumerate(pool) if isinstance(m, TinyNoBNNet)]
    assert all(terms["bn"][i] == 0 for i in bn_free)


def conv4_pool() -> list[tuple[nn.Module, list[str]]]:
    """Conv4 teachers (the fused path's own kernel), overlapping classes."""
    from dfml.models import build_model

    pool = []
    for seed, classes in enumerate([["a", "b", "c"], ["d", "e", "a"], ["f", "g", "h"], ["c", "h", "i"]]):
        torch.manual_seed(seed)
        model = build_model("conv4", 3, 1, 16, width=4)
        pool.append((randomise_running_stats(model, torch.Generator().manual_seed(seed)), classes))
    return pool


POOLS = {"mixed": (mixed_pool, IMAGE_SHAPE), "conv4": (conv4_pool, (1, 16, 16))}


@pytest.mark.parametrize("mode", ["sequential", "batched", "fused"])
@pytest.mark.parametrize("pool_name", sorted(POOLS))
def test_member_weighting_official_weights_member_j_by_n_minus_j_and_equal_by_one(pool_name, mode):
    """PURER's loop re-adds its running partial sum: member j (0-based, pool order) counts N - j times (METHODS
    2.3). Every path computes it; float64, so the comparison with the hand sum is tight."""
    make, shape = POOLS[pool_name]
    pool = [(model.double(), classes) for model, classes in make()]
    pseudo = pseudo_for(pool, image_shape=shape)
    images = pseudo.images.detach().double()
    singles = [loss_and_grad(InversionEngine([member], pseudo, mode="sequential"), images) for member in pool]
    n, grads = len(pool), {}
    for weighting, weight in (("official", lambda j: n - j), ("equal", lambda j: 1)):
        engine = InversionEngine(pool, pseudo, mode=mode, member_weighting=weighting)
        total, terms, grad = grads[weighting] = loss_and_grad(engine, images)
        torch.testing.assert_close(total, sum(weight(j) * single[0] for j, single in enumerate(singles)),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, sum(weight(j) * single[2] for j, single in enumerate(singles)),
                                   rtol=1e-10, atol=1e-14)
        # the logged per-member totals stay each member's own L_inv
        torch.testing.assert_close(terms["total"], torch.stack([single[0] for single in singles]),
                                   rtol=1e-12, atol=1e-12)
        assert engine.member_weighting == weighting and engine.path("cpu") == mode
    if (pool_name, mode) == ("conv4", "fused"):
        assert engine.fused_member_ids() == list(range(n))
    official, equal = grads["official"][2], grads["equal"][2]
    assert (official - equal).abs().max() > 0.1 * equal.abs().max()  # the two weightings differ


def test_an_unknown_member_weighting_is_refused():
    pool = mixed_pool()
    with pytest.raises(ValueError, match=r"member_weighting must be one of \('official', 'equal'\), got 'linear'"):
        InversionEngine(pool, pseudo_for(pool), member_weighting="linear")


def test_auto_mode_is_sequential_on_cpu():
    engine = InversionEngine(mixed_pool(), pseudo_for(mixed_pool()))
    assert not engine.uses_batched(torch.device("cpu"))
    assert engine.uses_batched(torch.device("cuda"))


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_nan_images_name_member_and_term(mode):
    pool = mixed_pool()
    pseudo = pseudo_for(pool)
    images = pseudo.images.detach().clone()
    images[pseudo.class_names.index("d"), 1] = float("nan")  # first covered by member 1
    engine = InversionEngine(pool, pseudo, mode=mode)
    with pytest.raises(FloatingPointError, match=r"nan for member 1 \(term ce\)"):
        engine.loss(images)


def test_inversion_loss_decreases_with_adam():
    class_lists = [["a", "b", "c"], ["d", "c", "e"]]
    pool = [(seeded_model(TinyBNNet, s), c) for s, c in enumerate(class_lists)]
    pool.append((seeded_model(TinyNoBNNet, 9), ["e", "a", "f"]))
    with torch.no_grad():
        for model, _ in pool:
            model.head.weight.mul_(20)  # confident heads, like trained teachers
    pseudo = PseudoDataset.for_pool([c for _, c in pool], IMAGE_SHAPE, shots=1, queries=3, lr=0.1)
    engine = InversionEngine(pool, pseudo, mode="sequential")
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        pseudo.optimizer.zero_grad()
        total, terms = engine.loss(pseudo.images, generator)
        total.backward()
        pseudo.optimizer.step()
        history.append((total.item(), terms["ce"]))
    (first_total, first_ce), (last_total, last_ce) = history[0], history[-1]
    assert last_total < 0.6 * first_total
    assert bool((last_ce < first_ce).all())


def test_head_smaller_than_class_list_is_rejected():
    pseudo = PseudoDataset(["a", "b", "c", "d"], 2, IMAGE_SHAPE)
    with pytest.raises(ValueError, match="outputs"):
        InversionEngine([(TinyBNNet(num_classes=3), ["a", "b", "c", "d"])], pseudo)


def test_teachers_are_frozen_and_in_eval_mode():
    pool = mixed_pool()
    for model, _ in pool:
        model.train()
    InversionEngine(pool, pseudo_for(pool))
    for model, _ in pool:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


# -- with the project's architectures -------------------------------------------------


def test_batched_matches_sequential_with_project_models():
    models = pytest.importorskip("dfml.models")
    generator = torch.Generator().manual_seed(0)

    def teacher(name, seed, **kwargs):
        torch.manual_seed(seed)
        return randomise_running_stats(models.build_model(name, 5, 3, 32, **kwargs), generator)

    classes = [f"class{i:02d}" for i in range(12)]
    pool = [
        (teacher("conv4", 0), classes[0:5]),
        (teacher("conv4", 1), classes[5:10][::-1]),
        (teacher("conv4", 2), [classes[i] for i in (10, 11, 0, 3, 7)]),
        (teacher("resnet10", 3, width=8), classes[2:7]),
        (teacher("resnet10", 4, width=8), classes[7:12]),
    ]
    pseudo = pseudo_for(pool, slots=2, image_shape=(3, 32, 32))
    engine = InversionEngine(pool, pseudo, mode="batched")
    assert sorted(g.member_ids for g in engine.batched_groups) == [[0, 1, 2], [3, 4]]
    assert_paths_agree(pool, pseudo, InversionWeights())
