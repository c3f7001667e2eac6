"""photo-patches (lrra/photos.py): a colour dataset that is not digits, built offline from the
photographs scikit-learn and matplotlib ship, the same on every build."""

from __future__ import annotations

import socket

import pytest
import torch

from lrra import photos
from lrra.data import dataset_info, load_split


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_builds_offline_with_the_documented_shapes_statistics_and_balanced_classes(no_network):
    photos.build_split.cache_clear()
    train_images, train_labels = photos.build_split(True)
    test_images, test_labels = photos.build_split(False)
    assert train_images.shape == (photos.TRAIN_SIZE, 3, 32, 32) and train_images.dtype == torch.uint8
    assert test_images.shape == (photos.TEST_SIZE, 3, 32, 32)
    assert train_labels.bincount().tolist() == [photos.TRAIN_SIZE // 10] * 10
    assert test_labels.bincount().tolist() == [photos.TEST_SIZE // 10] * 10
    pixels = train_images.float() / 255
    assert pixels.mean((0, 2, 3)).tolist() == pytest.approx(photos.MEAN, abs=1e-4)  # the normalisation used
    assert pixels.std((0, 2, 3)).tolist() == pytest.approx(photos.STD, abs=1e-4)
    again = photos.build_split.__wrapped__(True)
    assert torch.equal(again[0], train_images) and torch.equal(again[1], train_labels)


def test_each_crop_lies_inside_its_region(monkeypatch):
    # A stand-in photograph whose pixels hold their own row and column: a crop's values say where it was cut.
    height, width = 400, 600
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    cols = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    monkeypatch.setattr(photos, "_photo", lambda _: torch.stack([rows, cols, rows]))
    rng = torch.Generator().manual_seed(0)
    for region in photos.REGIONS:
        top, bottom = (round(r * height) for r in region.rows)
        left, right = (round(c * width) for c in region.cols)
        crops = torch.stack([photos._crop(region, rng) for _ in range(100)])
        assert crops[:, 0].min() >= top - 1e-3 and crops[:, 0].max() <= bottom - 1 + 1e-3
        assert crops[:, 1].min() >= left - 1e-3 and crops[:, 1].max() <= right - 1 + 1e-3


def test_the_dataset_is_known_to_lrra_data_in_colour():
    info = dataset_info(photos.NAME)
    assert (info.num_classes, info.channels, info.mean) == (10, 3, photos.MEAN)
    split = load_split(photos.NAME, "data", False, 32, 3)
    images, labels = split.tensors
    assert images.shape == (photos.TEST_SIZE, 3, 32, 32) and abs(float(images.mean())) < 0.5
