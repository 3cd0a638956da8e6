"""Pretraining one pool member on its own classes (METHODS.md 1.2).

Per class, the first ``1 - heldout_fraction`` of the images (store order) train the member and the
rest are held out; the checkpoint kept is the epoch with the best held-out accuracy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dfml.data.store import DatasetStore
from dfml.models import FewShotNet, build_model
from dfml.pool import MemberSpec


@dataclass
class PretrainResult:
    model: FewShotNet
    heldout_accuracy: float
    train_accuracy: float
    best_epoch: int
    seconds: float
    history: list[dict]


def member_tensors(store: DatasetStore, spec: MemberSpec, heldout_fraction: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, heldout_x, heldout_y) as normalised model inputs, labels in head order."""
    train_x, train_y, held_x, held_y = [], [], [], []
    size, channels = spec.architecture["image_size"], spec.architecture["in_channels"]
    for label, images in enumerate(store.load_classes(list(spec.classes))):
        n_held = max(1, round(images.shape[0] * heldout_fraction))
        if images.shape[0] - n_held < 1:
            raise ValueError(f"class {spec.classes[label]!r} has {images.shape[0]} images: too few to hold out {n_held}")
        x = store.model_input(images, size, channels)
        train_x.append(x[:-n_held])
        held_x.append(x[-n_held:])
        train_y.append(torch.full((images.shape[0] - n_held,), label))
        held_y.append(torch.full((n_held,), label))
    return torch.cat(train_x), torch.cat(train_y), torch.cat(held_x), torch.cat(held_y)


def make_optimizer(model: FewShotNet, settings: dict):
    opt = settings["optimizer"]
    if opt["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=opt["lr"], weight_decay=opt.get("weight_decay", 0.0))
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=opt["lr"], momentum=opt.get("momentum", 0.9),
                                    weight_decay=opt.get("weight_decay", 0.0))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=opt.get("milestones", []),
                                                     gamma=opt.get("gamma", 0.2))
    return optimizer, scheduler


@torch.no_grad()
def accuracy(model: FewShotNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        correct += (model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum().item()
    return correct / max(1, x.shape[0])


def pretrain_member(store: DatasetStore, spec: MemberSpec, settings: dict, device: torch.device | str = "cpu",
                    progress: bool = True) -> PretrainResult:
    """Train member ``spec``; ``settings`` = ``member_settings(...)["pretrain"]``. Deterministic per seed and device."""
    torch.manual_seed(spec.seed)
    train_x, train_y, held_x, held_y = (t.to(device) for t in member_tensors(store, spec, settings["heldout_fraction"]))
    model = build_model(**spec.architecture).to(device)
    optimizer, scheduler = make_optimizer(model, settings)
    order_gen = torch.Generator().manual_seed(spec.seed)
    best_state, best_acc, best_epoch, history = None, -1.0, 0, []
    start = time.perf_counter()
    epochs = tqdm(range(1, settings["epochs"] + 1), desc=f"member {spec.index} ({spec.model})",
                  disable=not progress, mininterval=1.0)
    for epoch in epochs:
        loss = train_one_epoch(model, optimizer, train_x, train_y, settings, order_gen)
        scheduler.step()
        held_acc = accuracy(model, held_x, held_y)
        history.append({"epoch": epoch, "train_loss": loss, "heldout_accuracy": held_acc})
        if held_acc > best_acc:
            best_acc, best_epoch, best_state = held_acc, epoch, copy.deepcopy(model.state_dict())
        epochs.set_postfix(loss=f"{loss:.3f}", heldout=f"{held_acc:.3f}", best=f"{best_acc:.3f}")
    model.load_state_dict(best_state)
    return PretrainResult(model.eval(), best_acc, accuracy(model, train_x, train_y), best_epoch,
                          time.perf_counter() - start, history)


def training_card_fields(result: PretrainResult, settings: dict) -> dict:
    """What a card says about the member's training; ``settings`` as for :func:`pretrain_member`."""
    return {"heldout_accuracy": round(result.heldout_accuracy, 6), "train_accuracy": round(result.train_accuracy, 6),
            "best_epoch": result.best_epoch, "training": settings, "train_seconds": round(result.seconds, 2),
            "history": result.history}


def train_one_epoch(model: FewShotNet, optimizer, x: torch.Tensor, y: torch.Tensor, settings: dict,
                    order_gen: torch.Generator) -> float:
    model.train()
    order = torch.randperm(x.shape[0], generator=order_gen).to(x.device)
    total, seen = 0.0, 0
    for start in range(0, x.shape[0], settings["batch_size"]):
        idx = order[start:start + settings["batch_size"]]
        if idx.numel() < 2:  # BatchNorm cannot train on a single image
            continue
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        optimizer.step()
        total += loss.item() * idx.numel()
        seen += idx.numel()
    if seen == 0:
        raise ValueError("no training batch with at least 2 images: the member has too few images")
    return total / seen
