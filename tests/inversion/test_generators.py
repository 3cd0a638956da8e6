"""Generators of BiDf-MKD / TACO and the per-image differentiable augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfml.inversion.augment import normalize, random_crop_flip
from dfml.inversion.generators import ConditionalGenerator, ImageGenerator, reinitialise

LATENT = 8
WIDTH = 4


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3), (30, 3)])
def test_image_generator_shape_and_range(image_size, channels):
    gen = reinitialise(ImageGenerator(LATENT, channels, image_size, WIDTH), _rng(0))
    images = gen(torch.randn(5, LATENT, generator=_rng(1)))
    assert images.shape == (5, channels, image_size, image_size)
    assert bool((images > 0).all()) and bool((images < 1).all())


def test_crop_path_is_centred():
    """image_size 30 decodes at 32 and keeps the centre rows/columns 1..30."""
    torch.manual_seed(0)
    gen = ImageGenerator(LATENT, 1, 30, WIDTH).eval()
    z = torch.randn(2, LATENT)
    full = gen.decoder.layers(gen.project(z).view(2, 2 * WIDTH, 8, 8))
    assert full.shape[-1] == 32
    assert torch.equal(gen(z), full[..., 1:31, 1:31])


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3), (30, 3)])
def test_conditional_generator_shape_and_range(image_size, channels):
    gen = reinitialise(ConditionalGenerator(LATENT, 5, channels, image_size, WIDTH), _rng(0))
    images = gen(torch.randn(5, LATENT, generator=_rng(1)), torch.arange(5))
    assert images.shape == (5, channels, image_size, image_size)
    assert bool((images > 0).all()) and bool((images < 1).all())


def test_decoder_is_shared_structure():
    plain = ImageGenerator(LATENT, 3, 32, WIDTH)
    cond = ConditionalGenerator(LATENT, 5, 3, 32, WIDTH)
    assert type(plain.decoder) is type(cond.decoder)
    shapes = [p.shape for p in plain.decoder.parameters()]
    assert shapes == [p.shape for p in cond.decoder.parameters()]


@pytest.mark.parametrize(
    "kwargs",
    [{"latent_dim": 0}, {"channels": 0}, {"image_size": 3}, {"width": 0}],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        ImageGenerator(**kwargs)
    with pytest.raises(ValueError):
        ConditionalGenerator(**kwargs)


def test_bad_z_shape():
    gen = ImageGenerator(LATENT, 1, 28, WIDTH)
    with pytest.raises(ValueError, match="z must have shape"):
        gen(torch.randn(3, LATENT + 1))
    with pytest.raises(ValueError, match="z must have shape"):
        gen(torch.randn(LATENT))


def test_reinitialise_reproducible():
    a = reinitialise(ImageGenerator(LATENT, 3, 32, WIDTH), _rng(7))
    b = reinitialise(ImageGenerator(LATENT, 3, 32, WIDTH), _rng(7))
    c = reinitialise(ImageGenerator(LATENT, 3, 32, WIDTH), _rng(8))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    weights_a = [p for n, p in a.named_parameters() if n.endswith("weight")]
    weights_c = [p for n, p in c.named_parameters() if n.endswith("weight")]
    assert all(not torch.equal(pa, pc) for pa, pc in zip(weights_a, weights_c))


def test_reinitialise_ignores_global_seed():
    torch.manual_seed(0)
    a = reinitialise(ImageGenerator(LATENT, 3, 32, WIDTH), _rng(3))
    torch.manual_seed(1)
    b = reinitialise(ImageGenerator(LATENT, 3, 32, WIDTH), _rng(3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_reinitialise_statistics():
    gen = ConditionalGenerator(LATENT, 5, 3, 32, width=64)
    gen.train()
    gen(torch.randn(4, LATENT), torch.arange(4))  # move BN running stats away from defaults
    reinitialise(gen, _rng(0))
    bns = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in gen.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(bns) == 3 and len(convs) == 5
    big_bn = max(bns, key=lambda m: m.num_features)
    assert big_bn.num_features == 128
    assert abs(float(big_bn.weight.detach().mean()) - 1.0) < 0.05
    big_conv = max(convs, key=lambda m: m.weight.numel())
    assert abs(float(big_conv.weight.detach().std()) - 0.02) < 0.2 * 0.02
    assert abs(float(big_conv.weight.detach().mean())) < 0.005
    for module in bns + convs:
        assert torch.count_nonzero(module.bias) == 0
    for bn in bns:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0


def test_reinitialise_rejects_non_generator():
    with pytest.raises(ValueError, match="torch.Generator"):
        reinitialise(ImageGenerator(LATENT, 1, 28, WIDTH), 0)


def test_conditional_depends_on_label():
    gen = reinitialise(ConditionalGenerator(LATENT, 5, 1, 28, WIDTH), _rng(0)).eval()
    z = torch.randn(1, LATENT, generator=_rng(1)).expand(5, LATENT)
    images = gen(z, torch.arange(5))
    for k in range(1, 5):
        assert not torch.allclose(images[0], images[k])


def test_conditional_bad_labels():
    gen = ConditionalGenerator(LATENT, 5, 1, 28, WIDTH)
    z = torch.randn(3, LATENT)
    with pytest.raises(ValueError, match="labels must lie"):
        gen(z, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="labels must lie"):
        gen(z, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        gen(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        gen(z, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("conditional", [False, True])
def test_gradients_reach_z_and_parameters(conditional):
    if conditional:
        gen = reinitialise(ConditionalGenerator(LATENT, 5, 3, 30, WIDTH), _rng(0))
    else:
        gen = reinitialise(ImageGenerator(LATENT, 3, 30, WIDTH), _rng(0))
    z = torch.randn(4, LATENT, generator=_rng(1)).requires_grad_()
    images = gen(z, torch.arange(4)) if conditional else gen(z)
    target = torch.rand(images.shape, generator=_rng(2))
    F.mse_loss(images, target).backward()
    assert z.grad is not None and bool(z.grad.abs().sum() > 0)
    # Per-channel biases of convs directly followed by train-mode BN are cancelled by the batch mean.
    cancelled = {"decoder.layers.2.bias", "decoder.layers.6.bias"}
    for name, param in gen.named_parameters():
        assert param.grad is not None, name
        if name not in cancelled:
            assert bool(param.grad.abs().sum() > 0), name


# ----------------------------------------------------------------------------- augmentation


def _reference_crop_flip(images, seed, padding, flip):
    """Slow per-image version that follows the documented draw order."""
    rng = _rng(seed)
    n, _, h, w = images.shape
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    flips = torch.rand(n, generator=rng) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(images, (padding,) * 4)
    out = []
    for i in range(n):
        window = padded[i, :, rows[i] : rows[i] + h, cols[i] : cols[i] + w]
        out.append(torch.flip(window, dims=(-1,)) if flips[i] else window)
    return torch.stack(out), rows, cols, flips


def test_crop_flip_per_image_independent():
    images = torch.rand(1, 3, 8, 8, generator=_rng(0)).expand(16, 3, 8, 8)
    out = random_crop_flip(images, _rng(1), padding=4)
    assert out.shape == images.shape
    assert any(not torch.equal(out[0], out[i]) for i in range(1, 16))


@pytest.mark.parametrize("padding,flip", [(4, True), (2, False), (0, True), (3, True)])
def test_crop_flip_matches_reference(padding, flip):
    images = torch.rand(12, 2, 7, 9, generator=_rng(0))
    out = random_crop_flip(images, _rng(5), padding=padding, flip=flip)
    expected, rows, cols, flips = _reference_crop_flip(images, 5, padding, flip)
    assert torch.equal(out, expected)
    if padding:
        assert len(set(rows.tolist())) > 1 and len(set(cols.tolist())) > 1
    if flip:
        assert 0 < int(flips.sum()) < len(flips)


def test_crop_flip_gradient():
    images = torch.rand(6, 3, 8, 8, generator=_rng(0)).requires_grad_()
    random_crop_flip(images, _rng(1), padding=4).sum().backward()
    assert bool(images.grad.abs().sum() > 0)
    assert bool((images.grad >= 0).all()) and bool((images.grad <= 1).all())

    plain = torch.rand(6, 3, 8, 8, generator=_rng(0)).requires_grad_()
    random_crop_flip(plain, _rng(1), padding=0, flip=False).sum().backward()
    assert torch.equal(plain.grad, torch.ones_like(plain))

    flipped_only = torch.rand(6, 3, 8, 8, generator=_rng(0)).requires_grad_()
    random_crop_flip(flipped_only, _rng(1), padding=0, flip=True).sum().backward()
    assert torch.equal(flipped_only.grad, torch.ones_like(flipped_only))


def test_crop_flip_identity():
    images = torch.rand(4, 3, 8, 8, generator=_rng(0))
    assert torch.equal(random_crop_flip(images, _rng(1), padding=0, flip=False), images)


def test_crop_flip_bad_arguments():
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.rand(2, 1, 4, 4), _rng(0), padding=-1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(torch.rand(1, 4, 4), _rng(0))


def test_normalize_broadcast_and_manual():
    images = torch.rand(2, 3, 4, 4, generator=_rng(0))
    out = normalize(images, [0.5], [0.25])
    assert torch.allclose(out, (images - 0.5) / 0.25)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize(images, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (images[:, c] - mean[c]) / std[c])


def test_normalize_gradient():
    images = torch.rand(2, 3, 4, 4, generator=_rng(0)).requires_grad_()
    normalize(images, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)).sum().backward()
    expected = torch.tensor([2.0, 4.0, 0.5]).view(1, 3, 1, 1).expand_as(images)
    assert torch.allclose(images.grad, expected)


def test_normalize_bad_arguments():
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="1 or 3 values"):
        normalize(images, (0.1, 0.2), (1.0,))
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize(images, (0.1,), (0.0,))
