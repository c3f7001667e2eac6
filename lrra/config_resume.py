"""Which configuration may continue a checkpoint: the resume rules.

Everything but the fields in RESUMABLE_CHANGES is the run's identity: resuming with another
learning rate, memory or loss weight would silently mix two configurations. Paths may move
(another machine, another Ray session's working folder); ``epochs`` may grow, and the cosine
schedule is rebuilt for the new length (lrra/distiller_state.py).
"""

from __future__ import annotations

from lrra.config import FIELD_TYPES, ConfigError, LRRAConfig

RESUMABLE_CHANGES = {
    "epochs": "may grow (the cosine schedule continues over the new length from the epoch reached)",
    "checkpoint_every": "how often checkpoints are written",
    "eval_batch_size": "evaluation batching only",
    "device": "where the run computes",
    "data_dir": "where the same dataset is found",
    "teacher_path": "where the same teacher is found",
}


def check_resumable(saved: LRRAConfig, new: LRRAConfig, epochs_done: int) -> None:
    """ConfigError naming every field that keeps ``new`` from continuing a checkpoint of ``saved``."""
    differing = [f"{name} (checkpoint {getattr(saved, name)!r}, now {getattr(new, name)!r})"
                 for name in FIELD_TYPES
                 if name not in RESUMABLE_CHANGES and getattr(saved, name) != getattr(new, name)]
    if differing:
        raise ConfigError(f"cannot resume: {', '.join(differing)} differ from the checkpoint's configuration; "
                          f"only {', '.join(RESUMABLE_CHANGES)} may change on resume")
    if new.epochs < epochs_done:
        raise ConfigError(f"cannot resume: config field 'epochs' = {new.epochs} is below the {epochs_done} "
                          "epochs the checkpoint has already run")
