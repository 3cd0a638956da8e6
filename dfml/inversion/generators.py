"""Image generators trained per generation event by BiDf-MKD and TACO (METHODS 4.1, 4.2).

Both methods invert a classifier by optimising a small generator (and its latent codes) with
Adam; the generator is re-initialised for every event (:func:`reinitialise`), so its weights
never carry information from one synthetic task to the next. The two generators share one
decoder and differ only in how the first ``2 * width`` channels at ``s x s`` are produced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_IMAGE_SIZE = 4
INIT_STD = 0.02


def seed_size(image_size: int) -> int:
    """Side ``s`` of the first feature map: two nearest x2 upsamplings take it to ``4 * s >= image_size``."""
    return math.ceil(image_size / 4)


def _check_sizes(latent_dim: int, channels: int, image_size: int, width: int) -> None:
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")


def _check_latent(z: Tensor, latent_dim: int) -> None:
    if z.dim() != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"z must have shape [N, {latent_dim}], got {list(z.shape)}")


class _Decoder(nn.Module):
    """``[N, 2w, s, s] -> [N, channels, image_size, image_size]`` in (0, 1), shared by both generators.

    BN -> up x2 -> conv(2w->2w)+BN+LReLU -> up x2 -> conv(2w->w)+BN+LReLU -> conv(w->channels)
    -> Sigmoid, then a centre crop when ``4 * s`` overshoots ``image_size`` (e.g. 30 -> 32 -> 30).
    """

    def __init__(self, channels: int, image_size: int, width: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.layers = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, seed: Tensor) -> Tensor:
        images = self.layers(seed)
        excess = images.shape[-1] - self.image_size
        if excess > 0:
            start = excess // 2
            stop = start + self.image_size
            images = images[..., start:stop, start:stop]
        return images


class ImageGenerator(nn.Module):
    """BiDf-MKD's generator: z [N, latent_dim] -> images [N, channels, image_size, image_size] in (0, 1)."""

    def __init__(
        self, latent_dim: int = 256, channels: int = 3, image_size: int = 32, width: int = 64
    ) -> None:
        super().__init__()
        _check_sizes(latent_dim, channels, image_size, width)
        self.latent_dim = latent_dim
        self.seed_size = seed_size(image_size)
        self.width = width
        self.project = nn.Linear(latent_dim, 2 * width * self.seed_size**2)
        self.decoder = _Decoder(channels, image_size, width)

    def forward(self, z: Tensor) -> Tensor:
        _check_latent(z, self.latent_dim)
        seed = self.project(z).view(z.shape[0], 2 * self.width, self.seed_size, self.seed_size)
        return self.decoder(seed)


class ConditionalGenerator(nn.Module):
    """TACO's label-conditional generator: (z [N, latent_dim], labels [N] long in 0..n_classes-1) -> images in (0, 1).

    one-hot(labels) and z are each projected to ``width`` channels at ``s x s``; their
    concatenation (labels first, then z) feeds the decoder shared with :class:`ImageGenerator`.
    """

    def __init__(
        self,
        latent_dim: int = 256,
        n_classes: int = 5,
        channels: int = 3,
        image_size: int = 32,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_sizes(latent_dim, channels, image_size, width)
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.latent_dim = latent_dim
        self.n_classes = n_classes
        self.seed_size = seed_size(image_size)
        self.width = width
        self.project_label = nn.Linear(n_classes, width * self.seed_size**2)
        self.project_latent = nn.Linear(latent_dim, width * self.seed_size**2)
        self.decoder = _Decoder(channels, image_size, width)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        _check_latent(z, self.latent_dim)
        self._check_labels(labels, z.shape[0])
        one_hot = F.one_hot(labels.long(), self.n_classes).to(z.dtype)
        shape = (z.shape[0], self.width, self.seed_size, self.seed_size)
        seed = torch.cat(
            [self.project_label(one_hot).view(shape), self.project_latent(z).view(shape)], dim=1
        )
        return self.decoder(seed)

    def _check_labels(self, labels: Tensor, n: int) -> None:
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape [{n}] to match z, got {list(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(
                f"labels must lie in [0, {self.n_classes - 1}], "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )


def _normal_like(param: Tensor, mean: float, rng: torch.Generator) -> Tensor:
    """N(mean, INIT_STD) drawn on the CPU from ``rng``, so the draw does not depend on the parameter's device."""
    values = torch.empty(param.shape, dtype=torch.float32).normal_(mean, INIT_STD, generator=rng)
    return values.to(device=param.device, dtype=param.dtype)


def reinitialise(generator: nn.Module, rng: torch.Generator) -> nn.Module:
    """Fresh weights for a new generation event, drawn from `rng` only: Conv/Linear weights N(0, 0.02), biases 0,
    BatchNorm weight N(1, 0.02), bias 0, running stats reset. Returns the module.

    Modules are visited in ``generator.modules()`` order, so one seed gives one set of weights.
    """
    if not isinstance(rng, torch.Generator):
        raise ValueError(f"rng must be a torch.Generator, got {type(rng).__name__}")
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                module.weight.copy_(_normal_like(module.weight, 0.0, rng))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.affine:
                    module.weight.copy_(_normal_like(module.weight, 1.0, rng))
                    module.bias.zero_()
                if module.track_running_stats:
                    module.reset_running_stats()
    return generator
