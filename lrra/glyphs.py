"""Datasets that are not digits, rendered offline from the fonts matplotlib ships.

The presets were first chosen on MNIST and on MNIST transformed (lrra.robustness). A user's
teacher sees other images, so these datasets check a recipe on shapes that are not digits,
the way notMNIST was made: each class is one character, each image that character drawn in
one of several typefaces and put through a random affine jitter, a random stroke weight and
a slight blur. Everything comes from matplotlib's bundled TrueType fonts (DejaVu, STIX,
Computer Modern), so no network and no system fonts are needed, and a fixed seed per split
draws the same images on every build.

* ``letters``: the Latin capitals A-J (notMNIST's classes) in 21 typefaces.
* ``greek``: ten Greek lowercase letters (α β γ δ ε ζ η θ λ π) in 16 typefaces, another script.

Both are grey, 28x28, 10 classes, 20,000 training and 4,000 test images, resized to the run's
``image_size`` by lrra.data like every other dataset. Train and test share the typefaces but
not the jitter: like MNIST's writers, the test images are new drawings of known hands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIDE = 28            # the built images' side, as MNIST's
CANVAS = 64          # glyphs are drawn at this side, jittered, then reduced to SIDE
TRAIN_SIZE, TEST_SIZE = 20_000, 4_000
SPLIT_SEEDS = {True: 11, False: 12}  # train, test: their own jitter streams

_DEJAVU = [f"DejaVu{family}{style}.ttf" for family in ("Sans", "SansMono", "Serif")
           for style in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                         "-BoldOblique" if family != "Serif" else "-BoldItalic")]
_STIX = ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"]
_COMPUTER_MODERN = ["cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf"]


@dataclass(frozen=True)
class GlyphDataset:
    name: str
    characters: str
    """One class per character, in label order."""
    fonts: tuple[str, ...]
    """File names under matplotlib's fonts/ttf folder."""
    mean: float
    """Mean and std of the built training images in [0, 1] (normalisation; a test checks them)."""
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.characters)


DATASETS: dict[str, GlyphDataset] = {d.name: d for d in (
    GlyphDataset("letters", "ABCDEFGHIJ", tuple(_DEJAVU + _STIX + _COMPUTER_MODERN), 0.1705, 0.3081),
    # Computer Modern's TrueType files map no Greek code points, so they are left out here.
    GlyphDataset("greek", "αβγδεζηθλπ", tuple(_DEJAVU + _STIX), 0.1671, 0.3091),
)}


def _font_folder() -> Path:
    import matplotlib  # late: only these datasets need it

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _draw(character: str, font_file: Path) -> np.ndarray:
    """The character in white on black, centred and scaled so its larger side fills 70 % of CANVAS."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_file), size=CANVAS * 2)
    left, top, right, bottom = font.getbbox(character)
    big = Image.new("L", (right - left + 8, bottom - top + 8))
    ImageDraw.Draw(big).text((4 - left, 4 - top), character, fill=255, font=font)
    box = big.getbbox()
    if box is None:
        raise ValueError(f"font {font_file.name} draws nothing for {character!r}")
    glyph = big.crop(box)
    scale = 0.7 * CANVAS / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    canvas = Image.new("L", (CANVAS, CANVAS))
    canvas.paste(glyph, ((CANVAS - glyph.width) // 2, (CANVAS - glyph.height) // 2))
    return np.asarray(canvas, dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def _templates(name: str) -> torch.Tensor:
    """[fonts, classes, CANVAS, CANVAS] in [0, 1]: every character of the dataset in every typeface."""
    spec, folder = DATASETS[name], _font_folder()
    return torch.tensor(np.stack([np.stack([_draw(c, folder / f) for c in spec.characters]) for f in spec.fonts]))


def _jitter_matrices(count: int, rng: torch.Generator) -> torch.Tensor:
    """Random affine maps (rotation ±15°, scale 0.75-1.1 with ±10 % aspect, shear ±0.3, shift ±10 %)."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=rng)

    angle, shear = uniform(-math.radians(15), math.radians(15)), uniform(-0.3, 0.3)
    scale, aspect = uniform(0.75, 1.1), uniform(0.9, 1.1)
    cos, sin = angle.cos(), angle.sin()
    # grid_sample reads the input at A·p for each output point p: A is the inverse of the drawn
    # transform, so dividing by the scale makes `scale` the glyph's drawn size.
    sx, sy = 1 / (scale * aspect), aspect / scale
    rows = [torch.stack([cos * sx, (-sin + shear * cos) * sx, uniform(-0.2, 0.2)], 1),
            torch.stack([sin * sy, (cos + shear * sin) * sy, uniform(-0.2, 0.2)], 1)]
    return torch.stack(rows, 1)


@lru_cache(maxsize=4)
def build_split(name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 1, SIDE, SIDE], int64 labels) of ``name``'s train or test split; balanced classes."""
    spec = DATASETS[name]
    templates = _templates(name)
    count = TRAIN_SIZE if train else TEST_SIZE
    rng = torch.Generator().manual_seed(SPLIT_SEEDS[train])
    labels = torch.arange(count) % spec.num_classes
    fonts = torch.randint(len(spec.fonts), (count,), generator=rng)
    matrices = _jitter_matrices(count, rng)
    thicken = torch.rand(count, generator=rng) < 0.3    # a heavier stroke than the typeface's
    blur = 0.3 + 0.7 * torch.rand(count, generator=rng)  # Gaussian sigma in output pixels
    images = torch.empty(count, 1, SIDE, SIDE, dtype=torch.uint8)
    for start in range(0, count, 2000):
        part = slice(start, start + 2000)
        canvas = templates[fonts[part], labels[part]].unsqueeze(1)
        grid = F.affine_grid(matrices[part], list(canvas.shape), align_corners=False)
        canvas = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        heavy = thicken[part].nonzero().squeeze(1)
        canvas[heavy] = _dilate(canvas[heavy])
        small = F.interpolate(canvas, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
        images[part] = (_blur(small, blur[part]).clamp(0, 1) * 255).round().to(torch.uint8)
    order = torch.randperm(count, generator=rng)  # classes interleaved, not in label order
    return images[order], labels[order]


def _dilate(images: torch.Tensor) -> torch.Tensor:
    """Each pixel the brightest of its 5x5 neighbourhood: a heavier stroke. A square window's maximum
    is the maximum of its rows' maxima, so two 5-tap passes give the 5x5 pool for less."""
    rows = F.max_pool2d(images, (1, 5), stride=1, padding=(0, 2))
    return F.max_pool2d(rows, (5, 1), stride=1, padding=(2, 0))


def _blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image blurred by its own Gaussian sigma (a 5-tap separable kernel)."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-taps.view(1, -1) ** 2 / (2 * sigmas.view(-1, 1) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # [N, 5]
    n = len(images)
    flat = images.view(1, n, SIDE, SIDE)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kernels.view(n, 1, 1, 5), groups=n)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kernels.view(n, 1, 5, 1), groups=n)
    return flat.view(n, 1, SIDE, SIDE)
