"""Glyph datasets (lrra/glyphs.py): images that are not digits, built offline, the same on every
build, and a short real distillation on each that stays finite and beats chance."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from lrra import glyphs, teacher
from lrra.cli import main
from lrra.config import preset
from lrra.data import dataset_info, load_split
from lrra.splits import subset
from lrra.teacher import load_teacher

TEACHER_IMAGES = 3000  # teachers of the distill test train on this slice of their training split


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def fresh_builds():
    """Every cache emptied, so that a build in the test really renders the fonts again. What the
    test built stays cached for the tests after it (the same images: the test shows they are)."""
    for cached in (glyphs._templates, glyphs.build_split):
        cached.cache_clear()


@pytest.mark.parametrize("name", sorted(glyphs.DATASETS))
def test_builds_offline_the_same_images_every_time_with_the_documented_shapes(name, no_network, fresh_builds):
    spec = glyphs.DATASETS[name]
    assert spec.num_classes == 10 and dataset_info(name).num_classes == 10
    built = {train: glyphs.build_split(name, train) for train in (True, False)}
    for train, size in ((True, glyphs.TRAIN_SIZE), (False, glyphs.TEST_SIZE)):
        images, labels = built[train]
        assert images.shape == (size, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.bincount().tolist() == [size // 10] * 10
        # every image has a bright stroke, and no image is mostly ink
        assert images.flatten(1).amax(1).min() > 100
        ink = (images > 63).flatten(1).float().mean(1)
        assert ink.min() > 0.02 and ink.max() < 0.7
    train_images = built[True][0].float() / 255
    # the registry's normalisation is that of the built training images
    assert abs(train_images.mean().item() - spec.mean) < 2e-3 and abs(train_images.std().item() - spec.std) < 2e-3

    # Rendered again from the fonts, the test split is the same; the training split is another.
    glyphs._templates.cache_clear()
    glyphs.build_split.cache_clear()
    again = glyphs.build_split(name, False)
    assert torch.equal(built[False][0], again[0]) and torch.equal(built[False][1], again[1])
    assert not torch.equal(built[True][0][: glyphs.TEST_SIZE], again[0])


def test_a_heavier_stroke_is_the_5x5_maximum():
    images = torch.rand(6, 1, 28, 28)
    assert torch.equal(glyphs._dilate(images), torch.nn.functional.max_pool2d(images, 5, stride=1, padding=2))


def test_every_typeface_draws_every_character():
    for name, spec in glyphs.DATASETS.items():
        templates = glyphs._templates(name)
        assert templates.shape[:2] == (len(spec.fonts), spec.num_classes)
        # no typeface falls back to an empty box or the same shape for two characters
        flat = templates.flatten(2)
        assert (flat.amax(2) > 0.5).all(), name
        for font in flat:
            distances = torch.cdist(font, font) + torch.eye(spec.num_classes) * 1e9
            assert distances.min() > 1.0, name


def test_loads_resized_and_normalised():
    images, labels = load_split("letters", "unused", False, image_size=32, channels=1).tensors
    assert images.shape == (glyphs.TEST_SIZE, 1, 32, 32) and labels.unique().tolist() == list(range(10))


@pytest.fixture
def teachers_on_a_slice(monkeypatch):
    """Teachers trained here see the first TEACHER_IMAGES of their training split: seconds, not a minute."""
    real_split = teacher.teacher_training_split

    def sliced(cfg):
        train_set, record = real_split(cfg)
        return subset(train_set, torch.arange(min(TEACHER_IMAGES, len(train_set)))), record

    monkeypatch.setattr(teacher, "teacher_training_split", sliced)


@pytest.mark.parametrize("dataset", sorted(glyphs.DATASETS))
def test_a_short_distill_stays_finite_and_beats_chance(dataset, teachers_on_a_slice, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "--preset", "mnist", "--set", f"dataset={dataset}", "--data-dir", str(tmp_path),
                 "--epochs", "3", "--set", "iters_per_epoch=10", "--set", "teacher_epochs=5",
                 "--out", str(out), "--tracking-uri", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for m in metrics for k, v in m.items() if k.startswith("loss/"))
    _, meta = load_teacher(next((tmp_path / "teachers").glob(f"{dataset}-*.pt")), preset("mnist", dataset=dataset))
    assert meta["test_accuracy"] > 0.6
    assert result["best_val_acc"] > 0.2 and result["test_acc"] > 0.2  # chance is 0.1
