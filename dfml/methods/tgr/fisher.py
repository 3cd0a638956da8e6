"""Task embeddings of pool members: the diagonal Fisher information of a probe network (TGR, METHODS 4.4).

A member is embedded by what a fixed **probe** network needs to classify the member's recovered images:
the mean over images of the squared per-image cross-entropy gradients w.r.t. the probe's backbone
parameters. Two members are similar when their Fisher diagonals weight the same parameters:
:func:`similarity` (TGR's) is the mean over parameter tensors of cos(F_a / (F_a + F_b), F_b / (F_a + F_b)).

How the probe is used on a member's images (choices of ours; the official probe is an ImageNet ResNet-34
whose 1000-way head cannot score a member's 5 relative labels):

* **head re-fit** (Task2Vec's recipe): a fresh linear head on the probe's features is fitted to the member's
  recovered labels, so the CE and its gradients say what *this member's* classes ask of the backbone. The CE
  against the probe's own argmax would ignore the member's labels altogether.
* **backbone only**: the head is fitted per member and its rows follow the member's arbitrary class order, so
  its Fisher would separate members with the same classes listed in another order.
* **batch statistics fixed**: a probe whose BN layers normalise with batch statistics (the meta-model) gets the
  statistics of the member's images, computed once, so each image's gradient is its own (a batch of one
  would normalise each image by itself).

Probes (``probe``): ``init``, the meta-model's initialisation (``metatrain.init``: the pool average where the
pool can be averaged, which saw meta-train classes only, through the members; else a seeded random Conv4),
or ``random``, a seeded random network of the meta-model's architecture. Neither needs a download or saw a
meta-test class.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dfml.meta.params import BACKBONE_PREFIX
from dfml.models import build_model

PROBES = ("init", "random")
FisherDiagonal = dict[str, Tensor]


def make_probe(kind: str, meta_model: nn.Module, seed: int) -> nn.Module:
    """A frozen copy of the meta-model as initialised (``init``), or a fresh seeded one of its architecture."""
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {kind!r}")
    if kind == "init":
        probe = copy.deepcopy(meta_model)
    else:
        with torch.random.fork_rng(devices=[]):  # the global RNG of the run stays untouched
            torch.manual_seed(seed)
            probe = build_model(**meta_model.config()).to(next(meta_model.parameters()).device)
    for parameter in probe.parameters():
        parameter.requires_grad_(False)
    return probe.eval()


def with_fixed_batch_statistics(model: nn.Module, images: Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode whose batch-statistics BN layers normalise with the statistics of
    ``images`` (mean and biased variance, as in a training-mode forward of that batch); running statistics
    elsewhere are kept."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    statistics = {}

    def record(norm, inputs):
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        statistics[norm] = (x.mean(dims), x.var(dims, unbiased=False))

    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    model.train()
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    for norm in norms:
        norm.track_running_stats = True
        norm.running_mean, norm.running_var = statistics[norm]
        norm.num_batches_tracked = torch.zeros((), dtype=torch.long, device=images.device)
    return model.eval()


def fit_head(features: Tensor, labels: Tensor, n_way: int, steps: int = 100, lr: float = 0.01) -> nn.Linear:
    """A linear head fitted by full-batch Adam from zero (deterministic; ``steps`` * ``lr`` bounds its weights,
    so a separable task keeps a non-zero loss and a non-vanishing Fisher)."""
    head = nn.Linear(features.shape[1], n_way).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    features = features.detach()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(features), labels).backward()
            optimizer.step()
    return head.requires_grad_(False)


def fisher_diagonal(model: nn.Module, images: Tensor, labels: Tensor, *, prefix: str = BACKBONE_PREFIX,
                    chunk: int = 64) -> FisherDiagonal:
    """Mean over images of the squared per-image CE gradients w.r.t. the parameters named ``prefix*``
    (``model`` as it is: call it in eval mode)."""
    weights = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    chosen = {k: v for k, v in weights.items() if k.startswith(prefix)}
    if not chosen:
        raise ValueError(f"the probe has no parameters named {prefix!r}*: {sorted(weights)}")

    def image_loss(params: dict, image: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, ({**weights, **params}, buffers), (image.unsqueeze(0),))
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_image = vmap(grad(image_loss), in_dims=(None, 0, 0))
    totals = {k: torch.zeros_like(v) for k, v in chosen.items()}
    for start in range(0, len(images), chunk):
        grads = per_image(chosen, images[start:start + chunk], labels[start:start + chunk])
        for name, g in grads.items():
            totals[name] += (g ** 2).sum(0)
    return {name: total / len(images) for name, total in totals.items()}


def task_embedding(probe: nn.Module, images: Tensor, labels: Tensor, n_way: int) -> FisherDiagonal:
    """A member's embedding: the probe's backbone Fisher on its recovered ``images`` (``labels`` 0..n_way-1),
    with the probe's BN statistics fixed to those images and its head re-fitted to the labels."""
    model = with_fixed_batch_statistics(probe, images)
    with torch.no_grad():
        features = model.backbone(images)
    model.head = fit_head(features, labels, n_way)
    return fisher_diagonal(model, images, labels)


def similarity(first: FisherDiagonal, second: FisherDiagonal, eps: float = 1e-20) -> float:
    """TGR's: mean over parameter tensors of cos(F_a / (F_a + F_b), F_b / (F_a + F_b)); 1 for identical
    embeddings, symmetric, in [0, 1] (Fisher entries are non-negative)."""
    if first.keys() != second.keys():
        raise ValueError(f"embeddings of different probes: {sorted(first)} vs {sorted(second)}")
    cosines = []
    for name in first:
        a, b = first[name].flatten().double(), second[name].flatten().double()
        total = a + b + eps
        cosines.append(F.cosine_similarity(a / total, b / total, dim=0))
    return float(torch.stack(cosines).mean())


def similarity_matrix(embeddings: list[FisherDiagonal]) -> Tensor:
    """[n, n] pairwise :func:`similarity` (diagonal 1)."""
    n = len(embeddings)
    matrix = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = similarity(embeddings[i], embeddings[j])
    return matrix


def dissimilarity_matrix(embeddings: list[FisherDiagonal]) -> Tensor:
    """[n, n] 1 - :func:`similarity` (diagonal 0): TGR's affinity for heterogeneous groups."""
    return 1.0 - similarity_matrix(embeddings)
