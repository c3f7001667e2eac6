"""Train, save and load teachers.

A teacher file is ``{"state_dict": ..., "meta": {...}}`` where meta records the architecture,
dataset, classes, image size, channels, normalisation and test accuracy. Loading checks that
metadata against the run's config before any distillation starts, and never unpickles code
(``weights_only=True``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrra import logs
from lrra.batchnorm_prior import batchnorm_layers, generator_ends_in_pixels, generator_warmup_steps
from lrra.config import ConfigError, LRRAConfig
from lrra.data import dataset_info, load_split
from lrra.models import build_classifier
from lrra.scoring import accuracy, resolve_device
from lrra.splits import EvaluationSplits, evaluation_splits, teacher_training_split
from lrra.teacher_files import (
    TeacherError,
    check_contract,
    check_teacher_meta,
    detect_format,
    first_line,
    input_contract,
    read_teacher,
)

__all__ = ["TeacherError", "check_teacher_meta", "load_teacher", "obtain_teacher", "prepare_teacher",
           "save_teacher", "train_teacher"]


def default_teacher_path(cfg: LRRAConfig) -> Path:
    """Where ``distill`` caches the teacher it trains when none is given."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cfg.dataset).strip("-").lower()
    return Path(cfg.data_dir) / "teachers" / f"{slug}-{cfg.teacher_arch}-{cfg.image_size}px-seed{cfg.seed}.pt"


@dataclass(frozen=True)
class Augmentation:
    """Random transforms applied to every training batch of a teacher, independently per image."""

    crop_padding: int = 0
    """Reflect-pad by this many pixels, then crop back to the original size at a random offset (0: no crop)."""
    hflip: bool = False
    """Mirror left-right with probability 1/2."""


NO_AUGMENTATION = Augmentation()
NATURAL_IMAGES = Augmentation(crop_padding=4, hflip=True)

# The one place that decides how each dataset's teacher is augmented (docs/design.md §5):
#   CIFAR10, CIFAR100, imagefolder:  pad-4 crop + horizontal flip, the standard recipe for
#                                    natural images: a mirrored cat is still a cat.
#   SVHN:                            pad-4 crop only: a mirrored digit is not the same digit
#                                    (2, 3, 7 read backwards), so flips would teach wrong images.
#   MNIST, FashionMNIST, KMNIST,     none: LeNet-5 reaches 99.25 % on MNIST without; digits and
#   digits:                          characters must not be mirrored, and a 4-pixel shift is half
#                                    of an 8x8 digits image.
# Names not listed: natural-image augmentation for 3 channels, none for 1 channel.
AUGMENTATIONS: dict[str, Augmentation] = {
    "CIFAR10": NATURAL_IMAGES,
    "CIFAR100": NATURAL_IMAGES,
    "imagefolder:": NATURAL_IMAGES,  # any imagefolder:PATH
    "SVHN": Augmentation(crop_padding=4),
    "MNIST": NO_AUGMENTATION,
    "FashionMNIST": NO_AUGMENTATION,
    "KMNIST": NO_AUGMENTATION,
    "digits": NO_AUGMENTATION,
}


def augmentation_for(dataset: str, channels: int) -> Augmentation:
    """The row of AUGMENTATIONS for ``dataset``, or the default for its number of channels."""
    key = "imagefolder:" if dataset.startswith("imagefolder:") else dataset
    return AUGMENTATIONS.get(key, NATURAL_IMAGES if channels == 3 else NO_AUGMENTATION)


def augment(images: torch.Tensor, how: Augmentation) -> torch.Tensor:
    """``how`` applied to an [N, C, H, W] batch, with its own random crop offset and flip per image.

    Written out rather than torchvision.transforms.v2.RandomCrop/RandomHorizontalFlip: those draw
    one set of random parameters per call, i.e. per batch when given a batch tensor.
    """
    n, _, h, w = images.shape
    out = images
    if how.crop_padding:
        pad = how.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        dx, dy = torch.randint(0, 2 * pad + 1, (n,)).tolist(), torch.randint(0, 2 * pad + 1, (n,)).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if how.hflip:
        flip = torch.rand(n, device=images.device) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
    return out


def train_teacher(cfg: LRRAConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Supervised training of ``cfg.teacher_arch`` on the real training split of ``cfg.dataset``,
    less the validation holdout of lrra/splits.py (recorded in the metadata as ``validation``)."""
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset, cfg.data_dir)
    if info.num_classes != cfg.num_classes:  # e.g. mnist-subset5 under the mnist preset's 10 classes
        raise ConfigError(f"config field 'num_classes' = {cfg.num_classes} is invalid: dataset {cfg.dataset!r} "
                          f"has {info.num_classes} classes; set --set num_classes={info.num_classes}")
    mean, std = input_contract(cfg)
    train_set, validation = teacher_training_split(cfg)
    test_set = load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels, mean, std)

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg.teacher_arch, cfg.num_classes, cfg.channels).to(device)
    is_resnet = cfg.teacher_arch.startswith("resnet")
    if is_resnet:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.teacher_lr, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.teacher_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.teacher_epochs)
    augmentation = augmentation_for(cfg.dataset, cfg.channels)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.teacher_batch_size, shuffle=True,
                                         drop_last=False)
    start = time.perf_counter()
    for epoch in range(cfg.teacher_epochs):
        model.train()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            images = augment(images, augmentation)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        acc = accuracy(model, test_set, device, cfg.eval_batch_size)
        logs.core.info(f"teacher epoch {epoch + 1}/{cfg.teacher_epochs}: loss {loss.item():.4f}  "
                       f"test acc {acc:.4f}  ({time.perf_counter() - start:.0f}s)")
    meta = {
        "arch": cfg.teacher_arch, "dataset": cfg.dataset, "num_classes": cfg.num_classes,
        "channels": cfg.channels, "image_size": cfg.image_size,
        "mean": list(mean), "std": list(std),
        "test_accuracy": acc, "epochs": cfg.teacher_epochs, "train_seconds": time.perf_counter() - start,
        "validation": validation,
    }
    return model.cpu().eval(), meta


def save_teacher(model: nn.Module, meta: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written teacher
    return path


def load_teacher(path: str | os.PathLike, cfg: LRRAConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Read a teacher file of any format (lrra.teacher_files) and check it takes the run's input contract."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher file {path} does not exist (train one with `python -m lrra teacher`)")
    fmt = detect_format(path) if cfg.teacher_format == "auto" else cfg.teacher_format
    model, meta = read_teacher(path.read_bytes(), fmt, cfg, str(path))
    check_contract(model, meta, cfg, str(path))
    return model, meta


def obtain_teacher(cfg: LRRAConfig) -> tuple[nn.Module, dict[str, Any], Path]:
    """The configured teacher, or the cached one, or a freshly trained and cached one."""
    if cfg.teacher_path:
        model, meta = load_teacher(cfg.teacher_path, cfg)
        return model, meta, Path(cfg.teacher_path)
    path = default_teacher_path(cfg)
    if path.is_file():
        model, meta = load_teacher(path, cfg)
        logs.core.info(f"using cached teacher {path} (test accuracy {meta['test_accuracy']:.4f})")
        return model, meta, path
    logs.core.info(f"no teacher given: training {cfg.teacher_arch} on {cfg.dataset} for {cfg.teacher_epochs} "
                   f"epochs (cached at {path})")
    model, meta = train_teacher(cfg)
    save_teacher(model, meta, path)
    return model, {"format": "lrra", **meta}, path


def near_chance(num_classes: int) -> float:
    """The accuracy under which a teacher is taken for a broken one: chance plus a tenth of the rest."""
    chance = 1 / num_classes
    return chance + 0.1 * (1 - chance)


def check_teacher(model: nn.Module, meta: dict[str, Any], evaluation: EvaluationSplits,
                  cfg: LRRAConfig, name: str) -> dict[str, Any]:
    """The teacher scored on the validation split under its contract (``val_accuracy``; also
    ``test_accuracy`` when its file does not record one). Near chance: TeacherError, before any distillation."""
    device = resolve_device(cfg.device)
    model = model.to(device)
    val = accuracy(model, evaluation.validation, device, cfg.eval_batch_size)
    if val < near_chance(cfg.num_classes):
        raise TeacherError(
            f"teacher {name} scores {val:.4f} on the validation split of {cfg.dataset!r}, near chance "
            f"({1 / cfg.num_classes:.4f}): it does not see these images as it was trained to. Usual causes: the "
            f"normalisation (input_mean/input_std, now mean {list(input_contract(cfg, meta)[0])}), the channel "
            f"order (RGB vs BGR) or count (channels={cfg.channels}), the image size (image_size={cfg.image_size}), "
            "or the order of the labels (class i of the teacher must be class i of the dataset)")
    checked = dict(meta, val_accuracy=val)
    if checked.get("test_accuracy") is None:
        checked["test_accuracy"] = accuracy(model, evaluation.test, device, cfg.eval_batch_size)
    model.cpu()
    return checked


@torch.no_grad()
def check_student_takes_contract(cfg: LRRAConfig) -> None:
    """ConfigError unless the student network accepts the teacher's images (LeNet-5 needs 16 px)."""
    student = build_classifier(cfg.student_arch, cfg.num_classes, cfg.channels).eval()
    try:
        student(torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size))
    except Exception as err:  # noqa: BLE001 - whatever the network raises, it cannot take these images
        raise ConfigError(f"config field 'student_arch' = {cfg.student_arch!r} is invalid: it cannot take "
                          f"{cfg.image_size}x{cfg.image_size} images with {cfg.channels} channel(s) "
                          f"({first_line(err)}); "
                          "pick a student for this image size, e.g. convnet_half") from None


def log_batchnorm_prior(cfg: LRRAConfig, model: nn.Module, meta: dict[str, Any]) -> None:
    """One line on whether the BatchNorm prior, and what comes with it, is on for this teacher."""
    layers = batchnorm_layers(model)  # counted, not hooked: the Distiller hooks the teacher it trains with
    if layers:
        output = "pixel values" if generator_ends_in_pixels(cfg, prior_on=True) else "an affine-free BatchNorm"
        steps = generator_warmup_steps(cfg, prior_on=True)
        warmup = f", after {steps} warm-up steps on the teacher's terms" if steps else ""
        logs.core.info(f"the teacher has {len(layers)} BatchNorm layers: the BatchNorm-statistics prior "
                       f"(w_bn={cfg.w_bn:g}) guides the generator, whose images end in {output}{warmup}")
        return
    why = (f"was exported for one batch size ({model.batch}), so its BatchNorm layers are not read"
           if getattr(model, "untapped_batch_norms", 0) else "shows no BatchNorm layers")
    logs.core.info(f"the {meta['format']} teacher {why}: the BatchNorm-statistics prior (w_bn) is off for this run")


def prepare_teacher(cfg: LRRAConfig) -> tuple[nn.Module, dict[str, Any], Path, EvaluationSplits]:
    """Everything a run needs of its teacher before distilling: the model (loaded, or trained and
    cached), its metadata with its validation score, its file, and the run's evaluation splits."""
    check_student_takes_contract(cfg)
    model, meta, path = obtain_teacher(cfg)
    evaluation = evaluation_splits(cfg, meta)
    meta = check_teacher(model, meta, evaluation, cfg, str(path))
    if cfg.w_bn > 0:
        log_batchnorm_prior(cfg, model, meta)
    if not getattr(model, "has_features", True) and cfg.w_a > 0:
        logs.core.info(f"the {meta['format']} teacher's penultimate features cannot be read: the generator's "
                       "activation term (w_a) is off for this run")
    logs.core.info(f"teacher {path} ({meta['format']}, {meta['arch']}): validation accuracy "
                   f"{meta['val_accuracy']:.4f}, test {meta['test_accuracy']:.4f}")
    return model, meta, path, evaluation
