import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dfml.models import (
    MODEL_NAMES,
    FewShotNet,
    average_state_dicts,
    build_model,
    count_parameters,
    load_average_into,
)
from dfml.models.card import META_MODEL_FORMAT, ModelFileError, load_meta_model

WAYS = 5


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


def seeded_model(seed: int, name: str = "conv4", **kwargs) -> FewShotNet:
    torch.manual_seed(seed)
    return build_model(name, WAYS, **kwargs)


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [28, 32, 84])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_and_feature_shapes(name, size, channels):
    model = build_model(name, WAYS, in_channels=channels, image_size=size).eval()
    x = images(2, channels, size)
    with torch.no_grad():
        assert model(x).shape == (2, WAYS)
        assert model.features(x).shape == (2, model.feature_dim)


@pytest.mark.parametrize(("size", "feature_dim"), [(32, 128), (84, 800), (28, 32)])
def test_conv4_feature_dim_follows_purer(size, feature_dim):
    assert build_model("conv4", WAYS, image_size=size).feature_dim == feature_dim


def test_width_option():
    conv4 = build_model("conv4", WAYS, width=64)
    assert conv4.feature_dim == 64 * 2 * 2
    assert conv4.backbone.blocks[0].conv.out_channels == 64
    assert build_model("resnet10", WAYS).feature_dim == 512
    assert build_model("resnet18", WAYS, width=16).feature_dim == 128


def test_adaptive_pooling_accepts_any_input_size():
    model = build_model("conv4", WAYS, image_size=32, pooling="adaptive").eval()
    assert model.feature_dim == 32
    with torch.no_grad():
        for size in (28, 32, 84):
            assert model(images(2, 3, size)).shape == (2, WAYS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_stats_only_has_no_running_buffers(name):
    model = build_model(name, WAYS, batch_stats_only=True)
    norms = batchnorms(model)
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert all(m.running_mean is None and m.running_var is None for m in norms)
    assert not any("running" in key or "num_batches" in key for key in model.state_dict())
    assert model.batch_stats_only
    x = images(4, 3, 32)
    with torch.no_grad():
        train_output = model.train()(x)
        eval_output = model.eval()(x)
    torch.testing.assert_close(eval_output, train_output)


def test_teacher_batchnorm_keeps_running_stats():
    model = build_model("conv4", WAYS)
    norms = batchnorms(model)
    assert all(type(m) is nn.BatchNorm2d and m.running_mean is not None for m in norms)
    assert not model.batch_stats_only


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_head_on_backbone_is_the_forward(name):
    model = build_model(name, WAYS).eval()
    x = images(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.backbone(x)), model(x))
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
    assert all(key.startswith(("backbone.", "head.")) for key, _ in model.named_parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="conv4", num_classes=5, image_size=84, width=64),
        dict(name="conv4", num_classes=5, in_channels=1, image_size=28, pooling="adaptive",
             batch_stats_only=True),
        dict(name="resnet10", num_classes=3, in_channels=1, image_size=28, width=8),
    ],
)
def test_config_round_trip(kwargs):
    original = build_model(**kwargs).eval()
    config = json.loads(json.dumps(original.config()))
    rebuilt = build_model(**config).eval()
    assert rebuilt.config() == config
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = images(2, config["in_channels"], config["image_size"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="available.*conv4.*resnet10.*resnet18"):
        build_model("vgg", WAYS)
    with pytest.raises(ValueError, match="image_size >= 16"):
        build_model("conv4", WAYS, image_size=8)
    with pytest.raises(ValueError, match="pooling"):
        build_model("conv4", WAYS, pooling="mean")
    with pytest.raises(ValueError, match="width"):
        build_model("resnet10", WAYS, width=0)


def test_initialisation():
    model = seeded_model(0, width=64)
    weight = model.backbone.blocks[1].conv.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    assert torch.all(model.head.bias == 0)
    for norm in batchnorms(model):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_parameter_counts():
    # conv4, 3 -> 32 -> 32 -> 32 -> 32 channels at 32x32, 5-way head:
    # block 1: 3*32*9 + 32 (conv) + 2*32 (BN) = 960; blocks 2-4: 32*32*9 + 32 + 64 = 9312 each;
    # head: 128*5 + 5 = 645.
    assert count_parameters(build_model("conv4", WAYS)) == 960 + 3 * 9312 + 645 == 29541
    # resnet10: stem 1728+128; stage 1 73984; stage 2 230144; stage 3 919040; stage 4 3673088;
    # head 512*5 + 5.
    assert count_parameters(build_model("resnet10", WAYS)) == 4900677
    # resnet18 adds one identity block per stage: 73984 + 295424 + 1180672 + 4720640.
    assert count_parameters(build_model("resnet18", WAYS)) == 4900677 + 6270720


def test_average_of_two_conv4_is_the_mean():
    first, second = seeded_model(0), seeded_model(1)
    with torch.no_grad():
        for model in (first, second):
            model.train()(images(8, 3, 32))  # moves the running statistics away from 0/1
    averaged = average_state_dicts([first, second])
    first_state, second_state = first.state_dict(), second.state_dict()
    assert averaged.keys() == first_state.keys()
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (first_state[key] + second_state[key]) / 2)
    second_state["backbone.blocks.0.norm.num_batches_tracked"].fill_(7)
    assert average_state_dicts([first_state, second_state])[
        "backbone.blocks.0.norm.num_batches_tracked"
    ].item() == 7


def test_average_rejects_different_architectures():
    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.conv\.weight"):
        average_state_dicts([build_model("conv4", WAYS), build_model("resnet10", WAYS)])
    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.conv\.weight.*\(32, 3, 3, 3\).*\(64, 3, 3, 3\)"):
        average_state_dicts([build_model("conv4", WAYS), build_model("conv4", WAYS, width=64)])


def test_load_average_into_batch_stats_meta_model():
    pool = [seeded_model(seed) for seed in range(3)]
    meta_model = build_model("conv4", WAYS, batch_stats_only=True)
    load_average_into(meta_model, pool)
    expected = average_state_dicts(pool)
    for key, value in meta_model.state_dict().items():
        torch.testing.assert_close(value, expected[key])

    with pytest.raises(ValueError, match=r"backbone\.blocks\.0\.conv\.weight"):
        load_average_into(build_model("resnet10", WAYS, batch_stats_only=True), pool)
    with pytest.raises(ValueError, match=r"head\.weight.*\(3, 128\)"):
        load_average_into(build_model("conv4", 3, batch_stats_only=True), pool)


def test_load_average_into_standard_model_keeps_running_stats():
    pool = [seeded_model(seed) for seed in range(2)]
    pool[1].backbone.blocks[2].norm.running_var.fill_(3.0)
    meta_model = load_average_into(build_model("conv4", WAYS), pool)
    assert torch.all(meta_model.backbone.blocks[2].norm.running_var == 2.0)


def vmapped_vs_looped(models: list[FewShotNet], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    params, buffers = stack_module_state(models)
    template = models[0]

    def run_one(one_params, one_buffers, inputs):
        return functional_call(template, (one_params, one_buffers), (inputs,))

    with torch.no_grad():
        vmapped = vmap(run_one, in_dims=(0, 0, None))(params, buffers, x)
        looped = torch.stack([model(x) for model in models])
    return vmapped, looped


def test_vmap_over_stacked_eval_teachers_matches_loop():
    teachers = [seeded_model(seed) for seed in range(3)]
    with torch.no_grad():
        for teacher in teachers:
            teacher.train()(images(8, 3, 32, seed=5))  # distinct running statistics per teacher
    teachers = [teacher.eval() for teacher in teachers]
    vmapped, looped = vmapped_vs_looped(teachers, images(6, 3, 32))
    assert vmapped.shape == (3, 6, WAYS)
    torch.testing.assert_close(vmapped, looped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["conv4", "resnet10"])
def test_vmap_over_batch_stats_models_matches_loop(name):
    models = [seeded_model(seed, name, batch_stats_only=True, width=8) for seed in range(3)]
    vmapped, looped = vmapped_vs_looped(models, images(6, 3, 32))
    torch.testing.assert_close(vmapped, looped, atol=1e-5, rtol=0)


def test_functional_call_uses_the_given_parameters():
    model = seeded_model(0, batch_stats_only=True)
    x = images(4, 3, 32)
    params = dict(model.named_parameters())
    shifted = {**params, "head.bias": params["head.bias"] + 1.0}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, shifted, (x,)), model(x) + 1.0)
        changed = {**params, "backbone.blocks.0.conv.weight": params["backbone.blocks.0.conv.weight"] * 2}
        assert not torch.allclose(functional_call(model, changed, (x,)), model(x))


def test_second_order_gradient_through_functional_call():
    model = seeded_model(0, batch_stats_only=True)
    x, y = images(10, 3, 32), torch.arange(10) % WAYS
    params = dict(model.named_parameters())
    support_loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=True)
    adapted = {key: p - 0.01 * g for (key, p), g in zip(params.items(), grads)}
    query_loss = nn.functional.cross_entropy(functional_call(model, adapted, (x,)), y)
    query_loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def save_meta_model(model: FewShotNet, directory):
    weights = directory / "meta_model.safetensors"
    save_file(dict(model.state_dict()), weights)
    card = {"format": META_MODEL_FORMAT, "architecture": model.config()}
    weights.with_suffix(".json").write_text(json.dumps(card))
    return weights


def test_meta_model_loads_from_its_card(tmp_path):
    model = seeded_model(3, batch_stats_only=True, width=8)
    loaded = load_meta_model(save_meta_model(model, tmp_path))
    assert loaded.config() == model.config()
    x = images(4, 3, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_meta_model_errors_name_the_file(tmp_path):
    weights = save_meta_model(seeded_model(3, batch_stats_only=True, width=8), tmp_path)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["architecture"]["width"] = 16
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match=r"meta_model\.safetensors: backbone\.blocks\.0\.conv\.weight has shape "
                                             r"\(8, 3, 3, 3\), the card's architecture \(meta_model\.json\) needs"):
        load_meta_model(weights)
    card_path.unlink()
    with pytest.raises(ModelFileError, match=r"meta_model\.json: unreadable card"):
        load_meta_model(weights)
    card_path.write_text(json.dumps(card))
    weights.unlink()
    with pytest.raises(ModelFileError, match=r"meta_model\.json: weights file .*meta_model\.safetensors is missing"):
        load_meta_model(weights)


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_conv4_max_pool_equals_atens_with_and_without_gradients(size):
    from dfml.models.conv4 import max_pool2x2

    x = torch.randn(3, 4, *size)
    expected = torch.nn.functional.max_pool2d(x, kernel_size=2)
    with torch.no_grad():
        assert torch.equal(max_pool2x2(x), expected)  # the values-only path (API queries, evaluation)
    leaf = x.clone().requires_grad_()
    out = max_pool2x2(leaf)
    assert torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), leaf)
    reference = x.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(torch.nn.functional.max_pool2d(reference, 2).square().sum(), reference)
    assert torch.equal(grad, expected_grad)
