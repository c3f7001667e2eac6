"""Robustness datasets: MNIST changed in the ways a user's data differ from MNIST.

The presets and the search space were first tuned on MNIST, but a user's teacher was trained on
something else. These datasets check that a recipe holds on data nobody tuned it on. Each is a
deterministic transform of the original MNIST splits (fixed seeds: every teacher, run and
search sees the same images), and lrra.data resolves it by name like any other dataset, so
``python -m lrra teacher --set dataset=mnist-rotated`` and ``distill --set dataset=...`` work
as for MNIST (the teacher's validation holdout of lrra/splits.py included). None is part of the
default search.

* ``mnist-inverted``: intensities inverted, dark digits on a white background; 10 classes,
  60,000 / 10,000 train / test images.
* ``mnist-rotated``: each image rotated by its own angle, uniform in ±45° (a fixed seed per
  split); 10 classes, 60,000 / 10,000 images.
* ``mnist-subset5``: only the digits 0-4, labels unchanged; 5 classes (set ``num_classes=5``),
  30,596 / 5,139 images.

All are built at MNIST's 28x28x1 and, like MNIST, resized to the run's ``image_size``
(32x32x1 in the mnist preset). Digits upscaled, the fourth case (1,437 small, blurry training
images), needs no builder: ``--preset mnist --set dataset=digits`` gives scikit-learn's 8x8
digits at 32x32 (lrra.data resizes every dataset to the run's image size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROTATION_DEGREES = 45.0
ROTATION_SEEDS = {True: 1, False: 2}  # train, test: different fixed angle streams per split
SUBSET_CLASSES = 5

Build = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
"""(uint8 images [N, 1, H, W], labels, train) -> the robustness dataset's (images, labels)."""


@dataclass(frozen=True)
class RobustnessDataset:
    name: str
    source: str
    """The torchvision dataset it is built from."""
    num_classes: int
    mean: float
    """Mean and std of the built training images in [0, 1] at 28x28 (normalisation; checked by a test)."""
    std: float
    build: Build


def invert(images: torch.Tensor, labels: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return 255 - images, labels


def rotation_angles(count: int, train: bool) -> torch.Tensor:
    """The angles (radians) of mnist-rotated's images: uniform in ±ROTATION_DEGREES, fixed per split."""
    generator = torch.Generator().manual_seed(ROTATION_SEEDS[train])
    return (torch.rand(count, generator=generator) * 2 - 1) * math.radians(ROTATION_DEGREES)


def rotate(images: torch.Tensor, labels: torch.Tensor, train: bool,
           chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image turned about its centre by its own angle of rotation_angles. Corners brought in
    from outside the image are black, like MNIST's background."""
    angles = rotation_angles(len(images), train)
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        theta = angles[start:start + chunk]
        cos, sin = theta.cos(), theta.sin()
        zero = torch.zeros_like(cos)
        matrices = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        batch = images[start:start + chunk].float()
        grid = F.affine_grid(matrices, list(batch.shape), align_corners=False)
        turned = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:start + chunk] = turned.round().clamp(0, 255).to(images.dtype)
    return out, labels


def first_classes(images: torch.Tensor, labels: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels < SUBSET_CLASSES
    return images[keep], labels[keep]


DATASETS: dict[str, RobustnessDataset] = {d.name: d for d in (
    RobustnessDataset("mnist-inverted", "MNIST", 10, 0.8693, 0.3081, invert),
    RobustnessDataset("mnist-rotated", "MNIST", 10, 0.1306, 0.2898, rotate),
    RobustnessDataset("mnist-subset5", "MNIST", SUBSET_CLASSES, 0.1309, 0.3090, first_classes),
)}
