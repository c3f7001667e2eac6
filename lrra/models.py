"""Teacher, student and generator networks, built by name.

Every classifier maps images to logits; called with ``return_features=True`` it also returns
its penultimate features (the generator's activation loss reads the teacher's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrra.external_models import PREFIXES, build_external

# ----------------------------------------------------------------------------------------
# CIFAR-style ResNets: 3x3 stem, stride 1, no max-pool (as in the DFKD literature).


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        layers, in_planes = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------------------
# LeNet-5 and its half-width student (DAFL's MNIST pair). Made for 32x32; any side from
# LENET_MIN_SIDE up works, the third convolution seeing its 5x5 input through an adaptive pooling
# (the identity at 32x32, so teachers trained at 32x32 are unchanged).

LENET_MIN_SIDE = 16  # each 5x5 convolution and 2x2 pooling needs the side the one before leaves


class LeNet5(nn.Module):
    THIRD_CONV = 6  # index in ``features`` of the convolution that expects a 5x5 input

    def __init__(self, num_classes: int, channels: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, f1 = (round(n * width) for n in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(c3, f1), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if min(x.shape[-2:]) < LENET_MIN_SIDE:
            raise ValueError(f"LeNet-5 takes images of at least {LENET_MIN_SIDE}x{LENET_MIN_SIDE}, "
                             f"got {tuple(x.shape[-2:])}")
        for index, layer in enumerate(self.features):
            if index == self.THIRD_CONV:
                x = F.adaptive_avg_pool2d(x, 5)
            x = layer(x)
        features = x
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------------------
# Small conv net with BatchNorm for any image size (the seconds-fast digits preset).


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, channels: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.body(x)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------------------
# The DCGAN-style generator of DAFL/DFAD/LRRA. The final affine-free BatchNorm keeps the
# images near zero mean and unit variance, i.e. in the teacher's normalised input space. For a
# teacher with BatchNorm the images end instead in pixel values under the teacher's normalisation
# (PixelsToInput): real inputs are not zero-mean and unit-variance (glyphs on black: -0.66 and
# 0.62), so the BatchNorm prior could never match the teacher's first layer otherwise.
# It starts from a map of side image_size / 2^k and doubles it k times, k = max(2, ceil(log2(side / 8))):
# the reference generator (8x8 -> 32x32) at 32 px, and a size that grows with the logarithm of the
# side rather than its square (7x7 -> 224x224 in five steps). A side that is not init * 2^k is cropped.


class PixelsToInput(nn.Module):
    """tanh's [-1, 1] as pixel values in [0, 1], normalised with the teacher's per-channel mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean) / self.std


class Generator(nn.Module):
    def __init__(self, latent_dim: int, image_size: int, channels: int, width: int = 128,
                 normalisation: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        """``normalisation``: None for DAFL's affine-free BatchNorm output, or the teacher's (mean,
        std), to end in pixel values under that normalisation (PixelsToInput)."""
        super().__init__()
        if image_size < 8:
            raise ValueError(f"generator image_size must be at least 8, got {image_size}")
        upsamplings = max(2, math.ceil(math.log2(image_size / 8)))
        self.init_size = math.ceil(image_size / 2**upsamplings)
        self.image_size = image_size
        self.width = width
        self.project = nn.Sequential(nn.Linear(latent_dim, width * self.init_size**2))
        first = [nn.BatchNorm2d(width), nn.Upsample(scale_factor=2),
                 nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)]
        # Stages beyond the reference's two go between its first and its last, so that at 32 px and
        # below the parameter names are the reference's (and older checkpoints still load).
        middle = [layer for _ in range(upsamplings - 2)
                  for layer in (nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True))]
        last = [nn.Upsample(scale_factor=2),
                nn.Conv2d(width, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh(),
                nn.BatchNorm2d(channels, affine=False) if normalisation is None else PixelsToInput(*normalisation)]
        self.body = nn.Sequential(*first, *middle, *last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        x = self.body(x)
        extra = x.shape[-1] - self.image_size
        if extra:  # centre crop to the asked side
            start = extra // 2
            x = x[..., start:start + self.image_size, start:start + self.image_size]
        return x


# ----------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda classes, channels: ResNet([2, 2, 2, 2], classes, channels),
    "resnet34": lambda classes, channels: ResNet([3, 4, 6, 3], classes, channels),
    "lenet5": lambda classes, channels: LeNet5(classes, channels, 1.0),
    "lenet5_half": lambda classes, channels: LeNet5(classes, channels, 0.5),
    "convnet": lambda classes, channels: ConvNet(classes, channels, 32),
    "convnet_half": lambda classes, channels: ConvNet(classes, channels, 16),
}


def build_classifier(arch: str, num_classes: int, channels: int) -> nn.Module:
    """A built-in network by name, or ``torchvision:NAME`` / ``timm:NAME`` (lrra.external_models)."""
    if arch.startswith(PREFIXES):
        return build_external(arch, num_classes, channels)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {sorted(ARCHITECTURES)}, "
                         "torchvision:NAME or timm:NAME")
    return ARCHITECTURES[arch](num_classes, channels)


def build_generator(latent_dim: int, image_size: int, channels: int, width: int,
                    normalisation: tuple[Sequence[float], Sequence[float]] | None = None) -> Generator:
    return Generator(latent_dim, image_size, channels, width, normalisation)
