"""Robustness datasets (lrra/robustness.py): the documented shapes and classes, transforms that
do what they say on every call, and a short real distillation on each that stays finite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lrra import robustness, teacher
from lrra.cli import main
from lrra.config import preset
from lrra.data import dataset_info, load_split
from lrra.splits import TRAIN_HOLDOUT, subset
from lrra.teacher import load_teacher

# name -> (classes, train images, test images), as documented in lrra/robustness.py
DOCUMENTED = {
    "mnist-inverted": (10, 60000, 10000),
    "mnist-rotated": (10, 60000, 10000),
    "mnist-subset5": (5, 30596, 5139),
}
TEACHER_IMAGES = 2000  # teachers of the distill test train on this slice of their training split


def test_every_robustness_dataset_is_documented_here():
    assert set(robustness.DATASETS) == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_loads_with_the_documented_shapes_classes_and_normalisation(name, mnist_data_dir):
    classes, train_size, test_size = DOCUMENTED[name]
    assert dataset_info(name).num_classes == classes
    for train, size, side in ((True, train_size, 28), (False, test_size, 32)):  # built at 28, resized as asked
        images, labels = load_split(name, str(mnist_data_dir), train, image_size=side, channels=1).tensors
        assert images.shape == (size, 1, side, side) and images.dtype == torch.float32
        assert labels.unique().tolist() == list(range(classes))
        if train:  # the registry's mean/std are those of the built training images: normalised, ~N(0, 1)
            assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01


def test_inversion_and_subset_do_what_they_say():
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    inverted, same_labels = robustness.invert(images, labels, True)
    assert torch.equal(inverted.int(), 255 - images.int()) and torch.equal(same_labels, labels)
    kept, kept_labels = robustness.first_classes(images, labels, True)
    assert kept_labels.tolist() == [0, 1, 2, 3, 4] * 2 and torch.equal(kept, images[labels < 5])


def test_rotation_turns_each_image_by_its_own_fixed_angle():
    # a horizontal bar through the centre: after rotation its principal axis is at the image's angle
    bars = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    bars[:, :, 13:15, 4:24] = 255
    labels = torch.zeros(16, dtype=torch.long)
    turned, _ = robustness.rotate(bars, labels, True)
    again, _ = robustness.rotate(bars, labels, True)
    assert torch.equal(turned, again)
    angles = robustness.rotation_angles(16, True)
    assert angles.abs().max() <= math.radians(robustness.ROTATION_DEGREES)
    assert not torch.equal(angles, robustness.rotation_angles(16, False))  # the test split has its own
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for image, angle in zip(turned[:, 0].float(), angles, strict=True):
        mass = image.sum()
        cx, cy = (image * xs).sum() / mass, (image * ys).sum() / mass
        mu20, mu02 = (image * (xs - cx) ** 2).sum(), (image * (ys - cy) ** 2).sum()
        mu11 = (image * (xs - cx) * (ys - cy)).sum()
        axis = 0.5 * math.atan2(2 * mu11, mu20 - mu02)
        assert abs(abs(axis) - abs(angle.item())) < math.radians(3)
        assert abs(mass / bars[0].float().sum() - 1) < 0.05  # the ink stays in the picture


@pytest.fixture
def teachers_on_a_slice(monkeypatch):
    """Teachers trained here see the first TEACHER_IMAGES of their real training split (less the
    validation holdout, as always): seconds instead of a minute per teacher."""
    real_split = teacher.teacher_training_split

    def sliced(cfg):
        train_set, record = real_split(cfg)
        return subset(train_set, torch.arange(min(TEACHER_IMAGES, len(train_set)))), record

    monkeypatch.setattr(teacher, "teacher_training_split", sliced)


@pytest.mark.parametrize("dataset", [*sorted(DOCUMENTED), "digits"])  # digits: upscaled to 32x32
def test_a_short_distill_through_the_cli_stays_finite(dataset, mnist_data_dir, teachers_on_a_slice,
                                                      tmp_path, capsys):
    classes = DOCUMENTED.get(dataset, (10,))[0]
    out = tmp_path / "run"
    code = main(["distill", "--preset", "mnist", "--set", f"dataset={dataset}", "--set", f"num_classes={classes}",
                 "--data-dir", str(mnist_data_dir), "--epochs", "2", "--set", "iters_per_epoch=3",
                 "--set", "kd_steps=2", "--set", "batch_size=32", "--set", "teacher_epochs=1",
                 "--set", "memory_push_size=8", "--out", str(out), "--tracking-uri", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "training images the teacher never saw" in captured.err  # the teacher's holdout validates
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert math.isfinite(result["best_val_acc"]) and math.isfinite(result["test_acc"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(math.isfinite(v) for m in metrics for k, v in m.items() if k.startswith("loss/"))
    cached = sorted((mnist_data_dir / "teachers").glob(f"{dataset}-lenet5-32px-*.pt"))
    _, meta = load_teacher(cached[0], preset("mnist", dataset=dataset, num_classes=classes))
    assert meta["validation"]["rule"] == TRAIN_HOLDOUT and meta["test_accuracy"] > 2 / classes


def test_a_class_subset_needs_its_number_of_classes(mnist_data_dir, capsys):
    code = main(["teacher", "--preset", "mnist", "--set", "dataset=mnist-subset5", "--data-dir", str(mnist_data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "config field 'num_classes' = 10 is invalid" in err and "--set num_classes=5" in err
