"""The task memory of generator-based data-free meta-learning (BiDf-MKD, TACO).

METHODS: "Per class and per split, a ring buffer of at most maxbatch generation batches; replay
episodes draw classes from all memory classes (cross-model), support from the support pool and
queries from the query pool". The generators recover images for the classes of one pool member at
a time; :meth:`TaskMemory.sample_task` then mixes classes that came from different members in one
replay task, which no single member could have produced.

The official code writes the recovered images to PNG files; we keep the tensors in memory (no
quantisation to 8 bits, no disk round trip) and checkpoint them with :mod:`dfml.checkpoint`.
Every draw uses the ``torch.Generator`` passed in, never the global RNG, so a run resumed from
:meth:`TaskMemory.state_dict` draws exactly the tasks the uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfml.meta.tasks import Task

SPLITS = ("support", "query")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class TaskMemory:
    """Per class and per split, a ring buffer of at most ``max_batches`` recovered batches."""

    def __init__(self, max_batches: int):
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        self.max_batches = int(max_batches)
        self._order: list[str] = []  # classes in first-insertion order
        # _slots[split][class]: the ring's batches by slot; _next[split][class]: the slot written next.
        self._slots: dict[str, dict[str, list[Tensor]]] = {split: {} for split in SPLITS}
        self._next: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
        self._image_shape: tuple[int, ...] | None = None

    def add(self, class_name: str, split: str, images: Tensor) -> None:
        """Store one recovered batch ``[n, C, H, W]`` of one class; a full ring overwrites its oldest batch."""
        _check_split(split)
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"images must be a non-empty batch [n, C, H, W], got shape {tuple(images.shape)}")
        shape = tuple(images.shape[1:])
        if self._image_shape is not None and shape != self._image_shape:
            raise ValueError(f"image shape {shape} differs from the memory's image shape {self._image_shape}")
        self._image_shape = shape
        if class_name not in self._order:
            self._order.append(class_name)
        slots = self._slots[split].setdefault(class_name, [])
        position = self._next[split].get(class_name, 0)
        batch = images.detach().clone()
        if position == len(slots):
            slots.append(batch)
        else:
            slots[position] = batch
        self._next[split][class_name] = (position + 1) % self.max_batches

    def add_recovered(self, images: Tensor, labels: Tensor, class_names: list[str], split: str) -> None:
        """Split a batch recovered for several classes by label (``labels[i]`` indexes ``class_names``)."""
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"need one label per image: {images.shape[0]} images, labels of shape "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise ValueError(f"labels must lie in 0..{len(class_names) - 1} (indices into {len(class_names)} "
                             f"class names), got {sorted(int(v) for v in torch.unique(labels.cpu()))}")
        for index, name in enumerate(class_names):
            mask = labels == index
            if bool(mask.any()):
                self.add(name, split, images[mask.to(images.device)])

    def classes(self, split: str | None = None) -> list[str]:
        """Classes holding ``split``; with ``None``, those holding both splits (the replayable ones)."""
        if split is not None:
            _check_split(split)
            return [name for name in self._order if name in self._slots[split]]
        return [name for name in self._order if all(name in self._slots[s] for s in SPLITS)]

    def batches(self, class_name: str, split: str) -> int:
        _check_split(split)
        return len(self._slots[split].get(class_name, []))

    def images(self, class_name: str, split: str) -> Tensor:
        """All stored images of one class and split, oldest batch first."""
        _check_split(split)
        if class_name not in self._slots[split]:
            raise ValueError(f"class {class_name!r} has no {split} images in the memory")
        slots = self._slots[split][class_name]
        start = self._next[split][class_name] if len(slots) == self.max_batches else 0
        return torch.cat(slots[start:] + slots[:start])

    def __len__(self) -> int:
        return len(self.classes())

    def num_images(self) -> int:
        return sum(batch.shape[0] for split in SPLITS for slots in self._slots[split].values() for batch in slots)

    def sample_task(self, way: int, shot: int, query: int, generator: torch.Generator,
                    device: torch.device | str | None = None) -> tuple[Task, list[str]]:
        """A replay task: ``way`` classes from any members, ``shot`` support and ``query`` query images each.

        The k-th drawn class gets label k in support and query alike, so labels align by construction.
        Returns the task and the drawn class names in label order.
        """
        if way < 1 or shot < 1 or query < 0:
            raise ValueError(f"need way >= 1, shot >= 1, query >= 0; got way={way}, shot={shot}, query={query}")
        replayable = self.classes()
        if len(replayable) < way:
            raise ValueError(f"a {way}-way task needs {way} classes holding both support and query images; "
                             f"the memory has {len(replayable)}")
        order = torch.randperm(len(replayable), generator=generator)[:way]
        names = [replayable[int(i)] for i in order]
        drawn = {split: [self._draw(name, split, count, generator) for name in names]
                 for split, count in (("support", shot), ("query", query))}
        support_x, query_x = torch.cat(drawn["support"]), torch.cat(drawn["query"])
        labels = torch.arange(way, device=support_x.device)
        tensors = (support_x, labels.repeat_interleave(shot), query_x, labels.repeat_interleave(query))
        if device is not None:
            tensors = tuple(t.to(device) for t in tensors)
        return Task(*tensors), names

    def _draw(self, class_name: str, split: str, count: int, generator: torch.Generator) -> Tensor:
        """``count`` images of one class and split, without replacement."""
        pool = self.images(class_name, split)
        if pool.shape[0] < count:
            raise ValueError(f"class {class_name!r} has {pool.shape[0]} {split} images, the task needs {count}")
        index = torch.randperm(pool.shape[0], generator=generator)[:count]
        return pool[index.to(pool.device)]

    def state_dict(self) -> dict:
        """Everything to restore exactly: per split, the batches in slot order and the next slot to write.

        Lists aligned with ``classes`` rather than dicts keyed by class name, so a name such as
        ``m0/a`` never becomes part of a checkpoint's tensor path; an empty list: the class lacks that split.
        """
        state: dict = {"max_batches": self.max_batches, "classes": list(self._order)}
        for split in SPLITS:
            state[split] = {
                "batches": [list(self._slots[split].get(name, [])) for name in self._order],
                "next": [self._next[split].get(name, 0) for name in self._order],
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; later adds and draws behave as if never saved."""
        self.__init__(int(state["max_batches"]))
        self._order = list(state["classes"])
        for split in SPLITS:
            part = state[split]
            for name, batches, position in zip(self._order, part["batches"], part["next"]):
                if batches:  # a class always holds >= 1 batch of each split it has
                    self._slots[split][name] = list(batches)
                    self._next[split][name] = int(position)
                    self._image_shape = tuple(batches[0].shape[1:])
