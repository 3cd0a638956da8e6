"""The outer loss of a meta-batch, as a loop over tasks or vmapped over stacked tasks.

``batched="auto"`` vmaps on CUDA; on a multi-core CPU it runs the loop's tasks in worker threads,
one task per core (:func:`map_single_threaded`), with the meta-gradient computed eagerly per task
(:class:`_EagerTaskLosses`). All paths call the same learner code (``Learner.loss_on_tensors``) and
agree on the loss and the meta-gradient. The vmap path differs in two technical points, both confined to this module:

* inner-loop gradients use ``torch.func.grad`` (``torch.autograd.grad`` cannot see through vmap);
* batch-statistics BatchNorm layers run on mean/var primitives instead of aten's fused kernel,
  because the vmap batching rule of the fused kernel's backward gives wrong input gradients, so
  the second-order meta-gradient silently differed from the loop (off by ~1e-3 on a tiny float64
  model in torch 2.14; pytorch/functorch#534). The primitive version is exact under vmap.
"""

from __future__ import annotations

import copy
import os
import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Literal, Sequence

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
    ``params`` live on CUDA (on CPU the loop measured faster), and on CPU runs the loop's tasks in
    parallel threads when :func:`_threaded_tasks_apply` allows it (same values; the returned loss
    then supports first-order backward only, as the meta step needs).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if _use_vmap(batched, params):
        batch = tasks if isinstance(tasks, TaskBatch) else stack_tasks(list(tasks))
        losses, accuracies = _vmapped_task_losses(learner, model, params, batch, training=training, steps=steps)
    elif batched == "auto" and _threaded_tasks_apply(model, params, tasks):
        losses, accuracies = _threaded_task_losses(learner, model, params, list(tasks), training=training,
                                                   steps=steps)
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


# ----------------------------------------------------------------------------- threads (CPU)

_WORKERS: list = []  # [ThreadPoolExecutor, size, pid], created on first use (again in a forked child)


def map_single_threaded(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None = None) -> list:
    """``[fn(item) for item in items]`` spread over worker threads, each running ATen single-threaded.

    ``workers`` defaults to ``torch.get_num_threads()``. On a small CPU, one independent unit of
    work (a task, a pool member) per core beats splitting every small op over the cores: no thread
    barrier per op, and no stall when another process holds a core. Each unit's numbers do not
    depend on the worker that ran it. The process-wide MKL thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    workers = min(threads if workers is None else workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    if not _WORKERS or _WORKERS[1] < workers or _WORKERS[2] != os.getpid():
        if _WORKERS and _WORKERS[2] == os.getpid():
            _WORKERS[0].shutdown(wait=True)
        _WORKERS[:] = [ThreadPoolExecutor(workers, thread_name_prefix="dfml-worker"), workers, os.getpid()]

    def single_threaded(item):
        torch.set_num_threads(1)  # this worker's OpenMP team; MKL's count is process-wide, restored below
        return fn(item)

    try:
        return list(_WORKERS[0].map(single_threaded, items))
    finally:
        torch.set_num_threads(threads)


def task_workers() -> int:
    """Worker threads for the meta-batch tasks: ``DFML_TASK_WORKERS``, else the torch thread count."""
    return int(os.environ.get("DFML_TASK_WORKERS", torch.get_num_threads()))


def _threaded_tasks_apply(model: nn.Module, params: ParamDict, tasks: Sequence[Task] | TaskBatch) -> bool:
    """CPU, more than one worker and task, a buffer-free model (nothing updated in place), plain
    leaf-free inputs (no graph into the task images) and no torch.func transform around."""
    if len(tasks) < 2 or task_workers() < 2 or any(w.is_cuda for w in params.values()):
        return False
    if any(True for _ in model.buffers()):
        return False
    tensors = [t for task in tasks for t in (task.support_x, task.support_y, task.query_x, task.query_y)]
    if any(t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(w) for w in params.values())


def _threaded_task_losses(learner: Learner, model: nn.Module, params: ParamDict, tasks: list[Task], *,
                          training: bool, steps: int | None) -> tuple[Tensor, Tensor]:
    names = list(params)
    needs_grad = training and torch.is_grad_enabled() and any(params[n].requires_grad for n in names)
    local = threading.local()  # one model copy per worker: functional_call swaps module attributes

    def run(task: Task):
        worker_model = getattr(local, "model", None)
        if worker_model is None:
            worker_model = local.model = copy.deepcopy(model)
        if not needs_grad:
            with torch.no_grad() if not training else torch.enable_grad():
                loss, accuracy = learner.task_loss(worker_model, {n: params[n].detach() for n in names}, task,
                                                   steps=steps, training=training)
            return loss.detach(), accuracy, None
        with torch.enable_grad():
            leaves = {n: params[n].detach().requires_grad_(params[n].requires_grad) for n in names}
            loss, accuracy = learner.task_loss(worker_model, leaves, task, steps=steps, training=True)
            wanted = [n for n in names if leaves[n].requires_grad]
            grads = torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
        return loss.detach(), accuracy, dict(zip(wanted, grads))

    results = map_single_threaded(run, tasks, task_workers())
    losses = torch.stack([loss for loss, _, _ in results])
    accuracies = torch.stack([accuracy for _, accuracy, _ in results])
    if not needs_grad:
        return losses, accuracies
    per_param = {}
    for n in results[0][2]:
        task_grads = [grads[n] for _, _, grads in results]
        if any(g is not None for g in task_grads):  # unused by every task (ProtoNet's head): no gradient, as the loop
            per_param[n] = torch.stack([torch.zeros_like(params[n]) if g is None else g for g in task_grads])
    values = [params[n] for n in names]
    losses = _EagerTaskLosses.apply(losses, [per_param.get(n) for n in names], *values)
    return losses, accuracies


class _EagerTaskLosses(torch.autograd.Function):
    """Per-task losses [T] whose meta-gradients were computed eagerly ([T, *shape] per parameter).

    The backward contracts the incoming per-task weights with them. First order only.
    """

    @staticmethod
    def forward(ctx, losses: Tensor, grads: list[Tensor | None], *values: Tensor) -> Tensor:
        ctx.grads = grads
        return losses.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: Tensor):
        out = []
        for grad in ctx.grads:
            out.append(None if grad is None else torch.tensordot(grad_losses.to(grad.dtype), grad, dims=1))
        return (None, None, *out)


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
