"""A colour dataset that is not digits, cut offline from the photographs Python packages ship.

The glyph datasets (lrra/glyphs.py) check the recipe on grey shapes; ``photo-patches`` checks it
on colour and texture. Each class is one region of one photograph: the four quadrants of
scikit-learn's two sample photographs (a temple in China, a flower) and the upper and lower half
of matplotlib's portrait of Grace Hopper, 10 classes in all. An image is a square crop of its
region (side 32 to 64 px of the photograph, randomly placed and mirrored) reduced to 32x32.

Train and test crops are drawn from the whole region with their own seeds: the test images are
new crops (place, size, mirroring) of known regions, as MNIST's test digits are new drawings of
known hands. (Test crops taken only from a part of each region that training never sees made
the task a different one: a LeNet-5 teacher scored 88 % on held-out training crops and 41 % on
those.) Both packages are dependencies of this project, so no network is needed, and a fixed
seed per split draws the same images on every build: 20,000 training and 4,000 test images,
balanced classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NAME = "photo-patches"
SIDE = 32
CROP_SIDES = (32, 64)      # a crop's side in the photograph's pixels, drawn uniformly
TRAIN_SIZE, TEST_SIZE = 20_000, 4_000
SPLIT_SEEDS = {True: 21, False: 22}
MEAN = (0.3654, 0.3956, 0.3747)  # of the built training images in [0, 1] (a test checks them)
STD = (0.3599, 0.2978, 0.3161)


@dataclass(frozen=True)
class Region:
    photo: str            # "sklearn:NAME" or "matplotlib:NAME"
    rows: tuple[float, float]
    cols: tuple[float, float]


def _quadrants(photo: str) -> list[Region]:
    return [Region(photo, rows, cols) for rows in ((0.0, 0.5), (0.5, 1.0)) for cols in ((0.0, 0.5), (0.5, 1.0))]


REGIONS: tuple[Region, ...] = (*_quadrants("sklearn:china.jpg"), *_quadrants("sklearn:flower.jpg"),
                               Region("matplotlib:grace_hopper.jpg", (0.0, 0.5), (0.0, 1.0)),
                               Region("matplotlib:grace_hopper.jpg", (0.5, 1.0), (0.0, 1.0)))
NUM_CLASSES = len(REGIONS)  # one class per region


def _photo_path(photo: str) -> Path:
    package, name = photo.split(":")
    if package == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


@lru_cache(maxsize=4)
def _photo(photo: str) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    from PIL import Image

    with Image.open(_photo_path(photo)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _crop(region: Region, rng: torch.Generator) -> torch.Tensor:
    """One [3, SIDE, SIDE] crop of ``region``, mirrored half of the time."""
    photo = _photo(region.photo)
    height, width = photo.shape[1:]
    top, bottom = (round(r * height) for r in region.rows)
    left, right = (round(c * width) for c in region.cols)
    largest = min(CROP_SIDES[1], bottom - top, right - left)
    side = int(torch.randint(CROP_SIDES[0], largest + 1, (1,), generator=rng))
    y = int(torch.randint(top, bottom - side + 1, (1,), generator=rng))
    x = int(torch.randint(left, right - side + 1, (1,), generator=rng))
    crop = photo[:, y:y + side, x:x + side]
    if torch.rand(1, generator=rng) < 0.5:
        crop = crop.flip(-1)
    return F.interpolate(crop.unsqueeze(0), size=(SIDE, SIDE), mode="bilinear", antialias=True,
                         align_corners=False)[0]


@lru_cache(maxsize=2)
def build_split(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, SIDE, SIDE], int64 labels) of the train or test split; classes interleaved."""
    count = TRAIN_SIZE if train else TEST_SIZE
    rng = torch.Generator().manual_seed(SPLIT_SEEDS[train])
    labels = torch.arange(count) % NUM_CLASSES
    images = torch.stack([_crop(REGIONS[int(label)], rng) for label in labels])
    order = torch.randperm(count, generator=rng)
    return (images[order].clamp(0, 1) * 255).round().to(torch.uint8), labels[order]
