import pytest
import torch

from dfml.models import average_state_dicts, build_model
from dfml.models.averaging import load_state_into
from dfml.models.ota import align_to_reference, ota_fuse

WAYS, CHANNELS, SIZE, WIDTH = 3, 1, 32, 6  # flatten: head input = 6 channels x 2 x 2


def model(seed: int, pooling: str = "flatten", batch_stats_only: bool = False):
    torch.manual_seed(seed)
    net = build_model("conv4", WAYS, CHANNELS, SIZE, width=WIDTH, pooling=pooling, batch_stats_only=batch_stats_only)
    with torch.no_grad():
        net.head.bias.normal_()
        for block in net.backbone.blocks:
            block.norm.weight.uniform_(0.5, 1.5)
            block.norm.bias.normal_(std=0.1)
        net.train()(batch(seed + 100))  # running statistics away from 0/1
    return net.eval()


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(8, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def outputs(state, pooling: str = "flatten", batch_stats_only: bool = False) -> torch.Tensor:
    net = load_state_into(model(0, pooling, batch_stats_only), state)
    with torch.no_grad():
        return net.eval()(batch())


def permuted_copy(state, seed: int = 0):
    """``state`` with every block's channels shuffled (none left in place) and the next layer rewired."""
    generator = torch.Generator().manual_seed(seed)
    copy = {key: tensor.clone() for key, tensor in state.items()}
    perm = None
    for block in range(4):
        prefix = f"backbone.blocks.{block}."
        if perm is not None:
            copy[prefix + "conv.weight"] = copy[prefix + "conv.weight"][:, perm]
        perm = torch.randperm(WIDTH, generator=generator)
        while (perm == torch.arange(WIDTH)).any():
            perm = torch.randperm(WIDTH, generator=generator)
        for name in ("conv.weight", "conv.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"):
            if prefix + name in copy:
                copy[prefix + name] = copy[prefix + name][perm]
    head = copy["head.weight"]
    copy["head.weight"] = head.reshape(WAYS, WIDTH, -1)[:, perm].reshape(head.shape)
    return copy


def assert_states_equal(actual, expected) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("pooling", ["flatten", "adaptive"])
def test_fusing_a_permuted_copy_gives_back_the_model_where_averaging_does_not(pooling):
    state = model(1, pooling).state_dict()
    copy = permuted_copy(state)
    torch.testing.assert_close(outputs(copy, pooling), outputs(state, pooling))  # same function

    assert_states_equal(ota_fuse([state, copy]), state)
    assert_states_equal(ota_fuse([copy, state], reference=1), state)
    averaged = average_state_dicts([state, copy])
    assert not torch.allclose(averaged["backbone.blocks.1.conv.weight"], state["backbone.blocks.1.conv.weight"])
    assert not torch.allclose(outputs(averaged, pooling), outputs(state, pooling), atol=1e-3)


@pytest.mark.parametrize("batch_stats_only", [False, True])
@pytest.mark.parametrize("pooling", ["flatten", "adaptive"])
def test_align_recovers_the_exact_permutation(pooling, batch_stats_only):
    state = model(2, pooling, batch_stats_only).state_dict()
    aligned = align_to_reference(state, permuted_copy(state, seed=3))
    assert list(aligned) == list(state)
    for key in state:
        assert torch.equal(aligned[key], state[key]), key


@pytest.mark.parametrize("batch_stats_only", [False, True])
@pytest.mark.parametrize("pooling", ["flatten", "adaptive"])
def test_aligned_model_computes_the_same_function_and_is_closer(pooling, batch_stats_only):
    reference = model(4, pooling, batch_stats_only).state_dict()
    other = model(5, pooling, batch_stats_only).state_dict()
    aligned = align_to_reference(reference, other)

    torch.testing.assert_close(outputs(aligned, pooling, batch_stats_only), outputs(other, pooling, batch_stats_only))

    def distance(state, keys) -> float:
        return sum((state[k] - reference[k]).pow(2).sum().item() for k in keys if state[k].is_floating_point())

    first_conv = ["backbone.blocks.0.conv.weight", "backbone.blocks.0.conv.bias"]
    assert distance(aligned, first_conv) < distance(other, first_conv)  # optimal at block 0, identity included
    assert distance(aligned, reference) < distance(other, reference)
    assert not torch.equal(aligned["head.weight"], other["head.weight"])
    assert torch.equal(aligned["head.bias"], other["head.bias"])  # classes are never permuted


def test_ota_fuse_loads_into_a_batch_stats_meta_model():
    pool = [model(seed) for seed in range(3)]
    fused = ota_fuse(pool)
    meta_model = load_state_into(
        build_model("conv4", WAYS, CHANNELS, SIZE, width=WIDTH, batch_stats_only=True), fused
    )
    for key, value in meta_model.state_dict().items():
        torch.testing.assert_close(value, fused[key])
    states = [net.state_dict() for net in pool]
    aligned = [states[0]] + [align_to_reference(states[0], state) for state in states[1:]]
    for key in ("head.weight", "backbone.blocks.2.norm.running_var"):
        torch.testing.assert_close(fused[key], sum(state[key] for state in aligned) / 3)
    with pytest.raises(ValueError, match=r"cannot load the fused state: key 'head\.weight'"):
        load_state_into(build_model("conv4", WAYS + 1, CHANNELS, SIZE, width=WIDTH), fused)


def test_bad_inputs_are_refused_with_a_clear_message():
    state = model(0).state_dict()
    with pytest.raises(ValueError, match="cannot fuse an empty list"):
        ota_fuse([])
    with pytest.raises(ValueError, match=r"reference index 2 is out of range for 2 models"):
        ota_fuse([state, state], reference=2)
    with pytest.raises(ValueError, match=r"reference index -1 is out of range"):
        ota_fuse([state, state], reference=-1)
    wider = build_model("conv4", WAYS, CHANNELS, SIZE, width=WIDTH + 1).state_dict()
    with pytest.raises(ValueError, match=r"cannot fuse: key 'backbone\.blocks\.0\.conv\.weight' has shape"):
        ota_fuse([state, wider])
    with pytest.raises(ValueError, match=r"cannot align: key 'backbone\.blocks\.0\.conv\.weight' has shape"):
        align_to_reference(state, wider)
    resnet = build_model("resnet10", WAYS, CHANNELS, SIZE, width=4).state_dict()
    with pytest.raises(ValueError, match=r"OTA fusion needs a conv4 state dict with keys backbone\.blocks.*missing"):
        ota_fuse([resnet, resnet])
    with pytest.raises(ValueError, match=r"conv4 state dict.*unexpected \['extra'\]"):
        align_to_reference({**state, "extra": torch.zeros(1)}, {**state, "extra": torch.zeros(1)})
