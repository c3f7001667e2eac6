"""The files of a run's checkpoint, for Ray Train worker groups and for trials in their own process.

A checkpoint is one directory that every rank writes into (Ray merges them): ``state.pt`` (rank 0:
``Distiller.state_dict()``), ``rank_<r>.pt`` (rank r's memory shard and random streams) and, at
the last epoch, ``best_student.pt`` (a teacher-format file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch
from torch import nn

from lrra.config import LRRAConfig
from lrra.preflight import DistributedSetupError
from lrra.runner import student_metadata
from lrra.teacher import save_teacher
from lrra.train import Distiller

STATE_FILE = "state.pt"
BEST_STUDENT_FILE = "best_student.pt"
# Only the latest checkpoint is needed to resume (the best student travels inside it); keep one
# spare so that a checkpoint being replaced is never the only one.
CHECKPOINTS_KEPT = 2


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def restore_from_directory(distiller: Distiller, directory: Path, world: int, shown_as: str) -> None:
    """``restore`` from a local checkpoint directory, for a run of ``world`` ranks."""
    written_by = len(list(directory.glob("rank_*.pt")))
    if written_by != world:
        raise DistributedSetupError(
            f"checkpoint {shown_as} holds the memory shards and random streams of {written_by} "
            f"workers but this run has {world}; resume it with --workers {written_by}")
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    rank_state = torch.load(directory / rank_file(distiller.rank), map_location="cpu", weights_only=True)
    distiller.load_state_dict(state, rank_state)


def save(distiller: Distiller, directory: Path, teacher_meta: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint; Ray merges the ranks' directories."""
    torch.save(distiller.rank_state_dict(), directory / rank_file(distiller.rank))
    if distiller.rank != 0:
        return
    torch.save(distiller.state_dict(), directory / STATE_FILE)
    if distiller.epoch == distiller.cfg.epochs:
        save_teacher(distiller.best_student_model(), student_metadata(distiller, teacher_meta),
                     directory / BEST_STUDENT_FILE)


def checkpoint_due(cfg: LRRAConfig, finished_epochs: int) -> bool:
    every = cfg.checkpoint_every
    return finished_epochs == cfg.epochs or (every > 0 and finished_epochs % every == 0)


def write_teacher_file(model: nn.Module, meta: dict[str, Any], path: str) -> None:
    """save_teacher to a local path or a storage URI (s3://, gs://)."""
    if "://" not in path:
        save_teacher(model, meta, path)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = save_teacher(model, meta, Path(folder) / BEST_STUDENT_FILE)
        fs, target = pyarrow.fs.FileSystem.from_uri(path)
        pyarrow.fs.copy_files(str(local), target, destination_filesystem=fs)
