"""The learnable pseudo dataset D of PURER (METHODS 2.2).

One block of ``slots_per_class`` images per meta-train class covered by the pool, stored
as a single Parameter [num_classes, slots, C, H, W] in the normalised input space.
A member (teacher) sees the blocks of its own classes, in ITS head order, with targets
equal to its own class indices; this makes the PURER-Plus misalignment bug (METHODS 2.7)
impossible by construction. Overlapping members read the same blocks, so their gradients add.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dfml.data.store import atomic_save_tensors

FORMAT_TAG = "dfml.pseudo_dataset.v1"


def class_index_map(class_names: Sequence[str]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(class_names)}
    if len(index) != len(class_names):
        raise ValueError(f"duplicate class names in {list(class_names)}")
    return index


def member_class_indices(class_index: dict[str, int], member_classes: Sequence[str]) -> list[int]:
    """Positions in the pseudo dataset of a member's classes, in the member's head order."""
    if len(set(member_classes)) != len(member_classes):
        raise ValueError(f"member class list has duplicates: {list(member_classes)}")
    missing = [c for c in member_classes if c not in class_index]
    if missing:
        raise KeyError(f"classes not in the pseudo dataset: {missing}")
    return [class_index[c] for c in member_classes]


def gather_member_view(
    images: Tensor, member_indices: Sequence[int] | Tensor
) -> tuple[Tensor, Tensor]:
    """(images [k * slots, C, H, W], targets [k * slots]) for a member with k classes.

    Rows are class-major: the slots of the member's class 0, then class 1, ...; the
    target of a row is the member's own index of the row's class.
    """
    index = torch.as_tensor(member_indices, dtype=torch.long, device=images.device)
    num_classes, slots = index.numel(), images.shape[1]
    view = images[index].reshape(num_classes * slots, *images.shape[2:])
    targets = torch.arange(num_classes, device=images.device).repeat_interleave(slots)
    return view, targets


class PseudoDataset:
    """Learnable pseudo images, one block of slots per class, with their own Adam."""

    def __init__(
        self,
        class_names: Sequence[str],
        slots_per_class: int,
        image_shape: Sequence[int],
        *,
        seed: int = 0,
        lr: float = 0.25,
        device: torch.device | str | None = None,
    ):
        self.class_names = sorted(class_names)
        self._class_index = class_index_map(self.class_names)
        if slots_per_class < 1:
            raise ValueError(f"slots_per_class must be >= 1, got {slots_per_class}")
        self.slots_per_class = int(slots_per_class)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.lr = float(lr)
        shape = (len(self.class_names), self.slots_per_class, *self.image_shape)
        # Drawn on CPU so the initial images do not depend on the device.
        generator = torch.Generator().manual_seed(seed)
        initial = torch.randn(shape, generator=generator)
        self.images = nn.Parameter(initial.to(device) if device is not None else initial)
        self.optimizer = self.make_optimizer()

    @classmethod
    def for_pool(
        cls,
        member_class_lists: Sequence[Sequence[str]],
        image_shape: Sequence[int],
        *,
        shots: int,
        queries: int,
        seed: int = 0,
        lr: float = 0.25,
        device: torch.device | str | None = None,
    ) -> "PseudoDataset":
        """Cover the union of the members' classes with shots + queries slots each."""
        classes = sorted({c for member in member_class_lists for c in member})
        return cls(classes, shots + queries, image_shape, seed=seed, lr=lr, device=device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def make_optimizer(self) -> torch.optim.Adam:
        """A fresh Adam over the images (default betas, no schedule; METHODS 2.2)."""
        self.optimizer = torch.optim.Adam([self.images], lr=self.lr)
        return self.optimizer

    def class_indices(self, member_classes: Sequence[str]) -> list[int]:
        return member_class_indices(self._class_index, member_classes)

    def member_view(self, member_classes: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(images, targets) of one member; target = the member's own index of the class."""
        return gather_member_view(self.images, self.class_indices(member_classes))

    def class_images(self, class_name: str) -> Tensor:
        return self.images[self._class_index[class_name]]

    # -- checkpointing -------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": FORMAT_TAG,
            "class_names": list(self.class_names),
            "slots_per_class": self.slots_per_class,
            "image_shape": list(self.image_shape),
            "lr": self.lr,
            "images": self.images.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_compatible(state["class_names"], tuple(state["images"].shape))
        with torch.no_grad():
            self.images.copy_(state["images"])  # in place: the optimizer keeps its reference
        self.lr = float(state.get("lr", self.lr))
        self.optimizer.load_state_dict(state["optimizer"])

    def _check_compatible(self, class_names: Sequence[str], shape: tuple[int, ...]) -> None:
        if list(class_names) != self.class_names:
            raise ValueError("pseudo dataset class names differ from the checkpoint's")
        if shape != tuple(self.images.shape):
            own_shape = tuple(self.images.shape)
            raise ValueError(f"pseudo images shape {own_shape} != checkpoint {shape}")

    def save(self, path: str | Path) -> None:
        """Write images (and Adam moments, if any) to safetensors; names go in metadata."""
        tensors = {"images": self.images.detach().cpu().contiguous()}
        metadata = {
            "format": FORMAT_TAG,
            "class_names": json.dumps(self.class_names),
            "slots_per_class": str(self.slots_per_class),
            "image_shape": json.dumps(list(self.image_shape)),
            "lr": repr(self.lr),
        }
        adam_state = self.optimizer.state.get(self.images)
        if adam_state:
            tensors["adam.exp_avg"] = adam_state["exp_avg"].detach().cpu().contiguous()
            tensors["adam.exp_avg_sq"] = adam_state["exp_avg_sq"].detach().cpu().contiguous()
            metadata["adam.step"] = repr(float(adam_state["step"]))
        atomic_save_tensors(tensors, Path(path), metadata=metadata)

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device | str | None = None, lr: float | None = None
    ) -> "PseudoDataset":
        """Rebuild from :meth:`save`; ``lr`` overrides the stored Adam learning rate."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            found = metadata.get("format")
            if found != FORMAT_TAG:
                raise ValueError(f"{path} is not a pseudo dataset file (format {found!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        class_names = json.loads(metadata["class_names"])
        pseudo = cls(
            class_names,
            int(metadata["slots_per_class"]),
            json.loads(metadata["image_shape"]),
            lr=float(metadata["lr"]) if lr is None else lr,
            device=device,
        )
        pseudo._check_compatible(class_names, tuple(tensors["images"].shape))
        with torch.no_grad():
            pseudo.images.copy_(tensors["images"])
        if "adam.exp_avg" in tensors:
            pseudo._restore_adam_moments(tensors, float(metadata["adam.step"]))
        for group in pseudo.optimizer.param_groups:
            group["lr"] = pseudo.lr
        return pseudo

    def _restore_adam_moments(self, tensors: dict[str, Tensor], step: float) -> None:
        device = self.images.device
        state = self.optimizer.state_dict()
        state["state"] = {
            0: {
                "step": torch.tensor(step),
                "exp_avg": tensors["adam.exp_avg"].to(device),
                "exp_avg_sq": tensors["adam.exp_avg_sq"].to(device),
            }
        }
        self.optimizer.load_state_dict(state)
