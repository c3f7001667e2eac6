"""Shared fixtures: a digits teacher trained once per session (seconds)."""

import pytest
import torch

from lrra.config import preset
from lrra.teacher import save_teacher, train_teacher


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
