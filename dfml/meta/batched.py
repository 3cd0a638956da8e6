"""The outer loss of a meta-batch, as a loop over tasks or vmapped over stacked tasks.

Both paths call the same learner code (``Learner.loss_on_tensors``) and agree on the loss and the
meta-gradient. The vmap path differs in two technical points, both confined to this module:

* inner-loop gradients use ``torch.func.grad`` (``torch.autograd.grad`` cannot see through vmap);
* batch-statistics BatchNorm layers run on mean/var primitives instead of aten's fused kernel,
  because the vmap batching rule of the fused kernel's backward gives wrong input gradients, so
  the second-order meta-gradient silently differed from the loop (off by ~1e-3 on a tiny float64
  model in torch 2.14; pytorch/functorch#534). The primitive version is exact under vmap.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from dfml.meta.learners import Learner, ParamDict, functorch_inner_gradients
from dfml.meta.tasks import Task, TaskBatch, stack_tasks

Reduction = Literal["sum", "mean"]
Batched = bool | Literal["auto"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def meta_batch_loss(learner: Learner, model: nn.Module, params: ParamDict, tasks: Sequence[Task] | TaskBatch, *,
                    training: bool, reduction: Reduction = "sum", batched: Batched = "auto",
                    steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Outer loss over the tasks (PURER sums it) and the mean query accuracy (detached).

    ``batched``: ``True`` vmaps over the stacked tasks, ``False`` loops, ``"auto"`` vmaps only when
    ``params`` live on CUDA (on CPU the loop measured faster).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if _use_vmap(batched, params):
        batch = tasks if isinstance(tasks, TaskBatch) else stack_tasks(list(tasks))
        losses, accuracies = _vmapped_task_losses(learner, model, params, batch, training=training, steps=steps)
    else:
        losses, accuracies = _looped_task_losses(learner, model, params, tasks, training=training, steps=steps)
    loss = losses.sum() if reduction == "sum" else losses.mean()
    return loss, accuracies.mean()


def _use_vmap(batched: Batched, params: ParamDict) -> bool:
    if batched == "auto":
        return any(w.is_cuda for w in params.values())
    if isinstance(batched, bool):
        return batched
    raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")


def _looped_task_losses(learner: Learner, model: nn.Module, params: ParamDict, tasks: Sequence[Task] | TaskBatch, *,
                        training: bool, steps: int | None) -> tuple[Tensor, Tensor]:
    results = [learner.task_loss(model, params, task, steps=steps, training=training) for task in tasks]
    if not results:
        raise ValueError("a meta-batch needs at least one task")
    losses, accuracies = zip(*results)
    return torch.stack(losses), torch.stack(accuracies)


def _vmapped_task_losses(learner: Learner, model: nn.Module, params: ParamDict, batch: TaskBatch, *,
                         training: bool, steps: int | None) -> tuple[Tensor, Tensor]:
    def one_task(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        return learner.loss_on_tensors(model, params, support_x, support_y, query_x, query_y,
                                       n_way=batch.n_way, steps=steps, training=training)

    with functorch_inner_gradients(), batch_norm_from_primitives(model):
        return torch.func.vmap(one_task, randomness="different")(
            batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )


@contextmanager
def batch_norm_from_primitives(model: nn.Module) -> Iterator[None]:
    """While active, BatchNorm layers that normalise with batch statistics use mean/var primitives.

    Swaps the ``forward`` of those module instances and restores it on exit, so the model is
    patched only for the duration (not thread-safe for a model shared across threads).
    """
    layers = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and _uses_batch_statistics(m)]
    for layer in layers:
        if layer.running_mean is not None:
            raise ValueError(
                f"{type(layer).__name__} in training mode updates its running statistics in place, which "
                "vmap cannot do; use a batch-statistics-only meta-model (track_running_stats=False) or batched=False"
            )
    originals = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer in layers:
            layer.forward = partial(_batch_norm_with_batch_statistics, layer)
        yield
    finally:
        for layer, original in zip(layers, originals):
            del layer.forward
            if original is not None:
                layer.forward = original


def _uses_batch_statistics(layer: nn.Module) -> bool:
    return layer.training or layer.running_mean is None


def _batch_norm_with_batch_statistics(layer: nn.Module, x: Tensor) -> Tensor:
    reduce_dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=reduce_dims, keepdim=True)
    variance = x.var(dim=reduce_dims, correction=0, keepdim=True)
    normalised = (x - mean) * torch.rsqrt(variance + layer.eps)
    channel_shape = (1, -1) + (1,) * (x.dim() - 2)
    if layer.weight is not None:
        normalised = normalised * layer.weight.reshape(channel_shape)
    if layer.bias is not None:
        normalised = normalised + layer.bias.reshape(channel_shape)
    return normalised
