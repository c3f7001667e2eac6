"""Which run a training process logs to, and the contexts that open it and end it with the block.

``distill`` in one process: tracked_distill. ``distill --workers N``: distill_target on the
driver makes the run, and the rank-0 worker logs to it through tracked_worker. A search: the
driver's RunTarget names only the parent run, and each trial narrows it to its own child run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from lrra.config import LRRAConfig
from lrra.teacher import default_teacher_path
from lrra.tracking.epochs import RunTracker
from lrra.tracking.runs import (
    ended_run,
    ending_with_block,
    log_run_inputs,
    open_distill_run,
    open_trial_run,
    reopen_run,
)
from lrra.tracking.store import connect


@contextmanager
def tracked_run(client: MlflowClient, run_id: str, cfg: LRRAConfig, teacher_meta: dict[str, Any],
                teacher_path: str | os.PathLike) -> Iterator[RunTracker]:
    """A RunTracker on ``run_id`` (config logged), ended according to how the block exits.

    FINISHED, KILLED (Ctrl-C) or FAILED: a block that logs its student and then raises leaves
    a FAILED run that holds that student.
    """
    log_run_inputs(client, run_id, cfg, teacher_meta, teacher_path)
    tracker = RunTracker(client, run_id, cfg, teacher_meta)
    with ending_with_block(tracker.end):
        yield tracker


def tracked_distill(tracking_uri: str, cfg: LRRAConfig, teacher_meta: dict[str, Any],
                    teacher_path: str | os.PathLike):
    """distill_local's ``track`` hook: a new top-level run."""
    client = connect(tracking_uri)
    return tracked_run(client, open_distill_run(client, cfg), cfg, teacher_meta, teacher_path)


@dataclass(frozen=True)
class RunTarget:
    """Where a Ray Train rank-0 worker logs; it travels to the worker in the train loop config.

    ``run_id``: the run the distill driver created, or a search trial's child run. A search's own
    target holds only ``parent_run_id``; ``for_trial`` turns it into a trial's, whose child run is
    found by the Tune trial id (a resumed trial continues it) or created.
    """

    tracking_uri: str
    run_id: str | None = None
    parent_run_id: str | None = None
    trial_id: str | None = None
    optuna_trial_number: int | None = None

    def for_trial(self, trial_id: str, optuna_trial_number: int | None) -> RunTarget:
        """This search target (``parent_run_id`` set) narrowed to one trial's child run, opened now.

        Opened by the trial's process, before its workers start: a trial whose workers never
        start still has its run (ended FAILED or KILLED when the search ends).
        """
        trial = dataclasses.replace(self, trial_id=trial_id, optuna_trial_number=optuna_trial_number)
        return dataclasses.replace(trial, run_id=trial.open(connect(self.tracking_uri)))

    def open(self, client: MlflowClient) -> str:
        if self.run_id is not None:
            reopen_run(client, self.run_id)  # a restarted worker group
            return self.run_id
        return open_trial_run(client, self.parent_run_id, self.trial_id,
                              optuna_trial_number=self.optuna_trial_number)


def tracked_worker(target: RunTarget, cfg: LRRAConfig, teacher_meta: dict[str, Any]):
    """The rank-0 worker's tracking context for ``target``."""
    client = connect(target.tracking_uri)
    # An empty teacher_path means the cached teacher, by the rule obtain_teacher follows.
    teacher_path = cfg.teacher_path or default_teacher_path(cfg)
    return tracked_run(client, target.open(client), cfg, teacher_meta, teacher_path)


@contextmanager
def distill_target(tracking_uri: str, cfg: LRRAConfig) -> Iterator[RunTarget]:
    """A new top-level run for `distill --workers N`, handed to the workers.

    Rank 0 ends it; ending it here too, as the block exits, covers a worker group that died
    without a word (FAILED) or a driver interrupted (KILLED).
    """
    client = connect(tracking_uri)
    with ended_run(client, open_distill_run(client, cfg)) as run_id:
        yield RunTarget(tracking_uri, run_id=run_id)
