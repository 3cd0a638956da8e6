"""A zero-order gradient estimator for losses computed through black-box APIs (BiDf-MKD, METHODS 4.1).

For each image x (d = C*H*W values) and q directions u_j uniform on the unit sphere,

    g(x) ~= (d / q) * sum_j [l(x + mu u_j) - l(x)] / mu * u_j

which is unbiased for the gradient of a mu-smoothed l, and whose cosine to the true gradient grows like
sqrt(q / (d + q - 1)) for a locally linear l (tests/inversion/test_zeroorder.py). The loss must be *per image*
(row i depends on image i only), so the q perturbed copies of every image can be sent to the API in a
few large batches instead of one call per image or direction.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# loss_fn(images [B, C, H, W], rows [B]: which image of x each row is a copy of) -> per-row loss [B]
PerImageLoss = Callable[[Tensor, Tensor], Tensor]


def sphere_directions(n: int, q: int, shape: tuple[int, ...], rng: torch.Generator, device=None,
                      dtype=torch.float32) -> Tensor:
    """[n, q, *shape] directions, each uniform on the unit sphere of R^d (Gaussian draw, normalised)."""
    u = torch.randn((n, q, math.prod(shape)), generator=rng, dtype=dtype)
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    return u.view(n, q, *shape).to(device)


def zero_order_gradient(loss_fn: PerImageLoss, x: Tensor, *, q: int, mu: float, rng: torch.Generator,
                        max_batch: int = 4096, base_loss: Tensor | None = None) -> Tensor:
    """The estimate of d l(x_i) / d x_i for every image of ``x`` [n, C, H, W], same shape as ``x``.

    ``base_loss`` (the per-image loss at ``x``, if the caller already has it) saves n queries. Images are
    perturbed in groups of at most ``max_batch // q`` images, so one call to ``loss_fn`` carries at most
    ``max(max_batch, q)`` rows; directions are drawn from ``rng`` group by group.
    """
    if q < 1 or not mu > 0:
        raise ValueError(f"the zero-order estimator needs q >= 1 directions and a step mu > 0, got q={q}, mu={mu}")
    if x.dim() != 4:
        raise ValueError(f"expected images [n, C, H, W], got shape {tuple(x.shape)}")
    x = x.detach()
    n, shape = x.shape[0], tuple(x.shape[1:])
    rows = torch.arange(n, device=x.device)
    with torch.no_grad():
        base = loss_fn(x, rows) if base_loss is None else base_loss.detach()
        if base.shape != (n,):
            raise ValueError(f"loss_fn must return one loss per image, shape ({n},), got {tuple(base.shape)}")
        gradient = torch.empty_like(x)
        group = max(1, max_batch // q)
        for start in range(0, n, group):
            stop = min(n, start + group)
            u = sphere_directions(stop - start, q, shape, rng, x.device, x.dtype)
            perturbed = (x[start:stop, None] + mu * u).flatten(0, 1)
            losses = loss_fn(perturbed, rows[start:stop].repeat_interleave(q)).view(stop - start, q)
            weights = (losses - base[start:stop, None]) * (math.prod(shape) / (q * mu))
            gradient[start:stop] = torch.einsum("nq,nq...->n...", weights, u)
    return gradient
