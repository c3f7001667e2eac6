"""A Distiller's checkpoint: what it holds, how a Distiller continues from it, and its file.

``CheckpointState`` gives the Distiller (lrra/train.py) its ``state_dict``, ``rank_state_dict``
and ``load_state_dict``: weights, optimisers, schedule, accuracy record, and per rank the replay
memory and random streams, so that a resumed run continues bit for bit. ``save_checkpoint`` and
``load_checkpoint`` write and read one such state as a single file (a single-process run's;
lrra/run_checkpoints.py splits it per rank for Ray Train).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lrra.config import ConfigError, LRRAConfig
from lrra.config_resume import check_resumable
from lrra.memory import ReplayMemory
from lrra.schedule import cosine_factor


class CheckpointError(ConfigError):
    """A checkpoint cannot be read or does not belong to this run; the message says which and why."""


class CheckpointState:
    """The checkpoint methods of lrra.train.Distiller, which sets the attributes declared here."""

    cfg: LRRAConfig
    epoch: int
    student: nn.Module
    student_average: AveragedModel | None
    generator: nn.Module
    opt_student: torch.optim.Optimizer
    opt_generator: torch.optim.Optimizer
    sched_student: torch.optim.lr_scheduler.LambdaLR
    accuracies: list[float]
    best_accuracy: float
    best_epoch: int
    best_student: dict[str, torch.Tensor] | None
    test_accuracy: float | None
    last_metrics: dict[str, float]
    memory: ReplayMemory
    latent_rng: torch.Generator
    replay_rng: torch.Generator
    device: torch.device

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: weights, optimisers, memory, RNGs, epoch."""
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "student_average": self.student_average.state_dict() if self.student_average is not None else None,
            "generator": self.generator.state_dict(),
            "opt_student": self.opt_student.state_dict(),
            "opt_generator": self.opt_generator.state_dict(),
            "sched_student": self.sched_student.state_dict(),
            "accuracies": list(self.accuracies),
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "best_student": self.best_student,
            "test_accuracy": self.test_accuracy,
            "last_metrics": dict(self.last_metrics),
            "rank_state": self.rank_state_dict(),
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """The part that differs between ranks: memory shard and random streams."""
        return {
            "memory": self.memory.state_dict(),
            "latent_rng": self.latent_rng.get_state(),
            "replay_rng": self.replay_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], rank_state: dict[str, Any] | None = None) -> None:
        """Continue from ``state`` (and this rank's ``rank_state``).

        The run's configuration must be the checkpoint's, except the fields that
        ``lrra.config_resume.check_resumable`` allows to change; a longer ``epochs`` rebuilds the
        cosine schedule for the new length from the epoch reached.
        """
        check_resumable(LRRAConfig.from_dict(state["config"]), self.cfg, state["epoch"])
        self.epoch = state["epoch"]
        self.student.load_state_dict(state["student"])
        if self.student_average is not None:
            self.student_average.load_state_dict(state["student_average"])
        self.generator.load_state_dict(state["generator"])
        self.opt_student.load_state_dict(state["opt_student"])
        self.opt_generator.load_state_dict(state["opt_generator"])
        self.sched_student.load_state_dict(state["sched_student"])
        # The optimiser holds the checkpoint's rate; with another ``epochs`` the schedule says otherwise.
        for group, base_lr in zip(self.opt_student.param_groups, self.sched_student.base_lrs, strict=True):
            group["lr"] = base_lr * cosine_factor(self.epoch, self.cfg.epochs)
        self.accuracies = list(state["accuracies"])
        self.best_accuracy, self.best_epoch = state["best_accuracy"], state["best_epoch"]
        self.best_student = state["best_student"]
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.test_accuracy = state.get("test_accuracy")
        rank_state = rank_state if rank_state is not None else state["rank_state"]
        self.memory.load_state_dict(rank_state["memory"], self.device)
        self.latent_rng.set_state(rank_state["latent_rng"])
        self.replay_rng.set_state(rank_state["replay_rng"])
        torch.set_rng_state(rank_state["torch_rng"])


def save_checkpoint(state: dict[str, Any], path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("config", "epoch", "student", "generator", "opt_student", "opt_generator", "sched_student",
                   "accuracies", "best_accuracy", "best_epoch", "best_student", "rank_state")


def load_checkpoint(path) -> dict[str, Any]:
    """A checkpoint written by save_checkpoint; CheckpointError (one line) for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, pickled code: all mean "not ours"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is not a readable LRRA checkpoint ({first_line})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not an LRRA distill checkpoint (missing {missing})")
    return state
