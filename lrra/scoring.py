"""Scoring a classifier: its top-1 accuracy on a labelled dataset, on the device a config names.

Shared by the distiller (validation every epoch, the test split once), teacher training and
checks (lrra/teacher.py) and the logged student's scores (lrra/tracking/student.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def resolve_device(name: str) -> torch.device:
    """The device config field ``device`` names: 'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config field 'device' = {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


def iterate_batches(dataset: Dataset, batch_size: int):
    """(images, labels) batches in order; slices tensors directly when it can (fast path)."""
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
    else:
        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode (restores the previous train/eval mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in iterate_batches(dataset, batch_size):
        logits = model(images.to(device))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
