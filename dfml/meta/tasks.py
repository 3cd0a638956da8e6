"""Few-shot tasks as tensors: one :class:`Task`, or a :class:`TaskBatch` with a leading task dim.

Labels are ``0..N-1`` (``N = n_way``); every support class must be present. Shape checks live in
:func:`check_task_shapes`, which only reads shapes, so the learners can also run it inside
``torch.func.vmap``. Label values are checked once, when a ``Task`` is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor


def check_task_shapes(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> None:
    """Raise ``ValueError`` unless images are ``[n, *image_shape]`` with one label per image."""
    for name, images, labels in (("support", support_x, support_y), ("query", query_x, query_y)):
        if images.dim() < 2:
            raise ValueError(f"{name}_x must be [n, *image_shape], got shape {tuple(images.shape)}")
        if labels.dim() != 1:
            raise ValueError(f"{name}_y must be a 1-D label vector, got shape {tuple(labels.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name}_x has {images.shape[0]} images but {name}_y has {labels.shape[0]} labels"
            )
        if labels.dtype != torch.long:
            raise ValueError(f"{name}_y must hold torch.long class indices, got {labels.dtype}")
    if support_x.shape[1:] != query_x.shape[1:]:
        raise ValueError(
            f"support and query images differ in shape: {tuple(support_x.shape[1:])} "
            f"vs {tuple(query_x.shape[1:])}"
        )
    if support_x.shape[0] == 0:
        raise ValueError("the support set is empty")


def infer_n_way(support_y: Tensor, query_y: Tensor) -> int:
    """``N`` such that the support labels are exactly ``{0..N-1}`` and the query labels within it."""
    support_labels = sorted(int(label) for label in torch.unique(support_y.detach().cpu()))
    n_way = len(support_labels)
    if support_labels != list(range(n_way)):
        raise ValueError(
            f"support_y must use every label 0..{n_way - 1} of a {n_way}-way task, got labels {support_labels}"
        )
    if query_y.numel() and (int(query_y.min()) < 0 or int(query_y.max()) >= n_way):
        query_labels = sorted(int(label) for label in torch.unique(query_y.detach().cpu()))
        raise ValueError(
            f"query_y must lie in 0..{n_way - 1} (the {n_way} support classes), got labels {query_labels}"
        )
    return n_way


@dataclass(frozen=True)
class Task:
    """One N-way task: ``support_x [N*K, C, H, W]``, ``support_y [N*K]`` in ``0..N-1``, and the query."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    n_way: int = field(init=False)

    def __post_init__(self) -> None:
        check_task_shapes(self.support_x, self.support_y, self.query_x, self.query_y)
        object.__setattr__(self, "n_way", infer_n_way(self.support_y, self.query_y))

    @classmethod
    def from_episode(cls, episode: Any) -> "Task":
        """Any object with ``support_x, support_y, query_x, query_y`` (e.g. ``dfml.data`` episodes)."""
        return cls(episode.support_x, episode.support_y, episode.query_x, episode.query_y)


@dataclass(frozen=True)
class TaskBatch:
    """``T`` tasks of identical shapes stacked on a leading dim: ``support_x [T, N*K, C, H, W]``..."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    n_way: int

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in (self.support_x, self.support_y, self.query_x, self.query_y)}
        if len(sizes) != 1:
            raise ValueError(f"the four tensors of a TaskBatch disagree on the number of tasks: {sorted(sizes)}")
        check_task_shapes(self.support_x[0], self.support_y[0], self.query_x[0], self.query_y[0])

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: int) -> Task:
        return Task(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])

    def __iter__(self) -> Iterator[Task]:
        return (self[index] for index in range(len(self)))


def stack_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """Stack tasks of identical shapes and way into a :class:`TaskBatch`."""
    if not tasks:
        raise ValueError("cannot stack an empty list of tasks")
    first = tasks[0]
    for index, task in enumerate(tasks[1:], start=1):
        if _shape_signature(task) != _shape_signature(first) or task.n_way != first.n_way:
            raise ValueError(
                f"task {index} has shapes {_shape_signature(task)} and {task.n_way} ways, task 0 has "
                f"{_shape_signature(first)} and {first.n_way} ways; only identical tasks can be stacked"
            )
    return TaskBatch(
        torch.stack([task.support_x for task in tasks]),
        torch.stack([task.support_y for task in tasks]),
        torch.stack([task.query_x for task in tasks]),
        torch.stack([task.query_y for task in tasks]),
        first.n_way,
    )


def _shape_signature(task: Task) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in (task.support_x, task.support_y, task.query_x, task.query_y))
