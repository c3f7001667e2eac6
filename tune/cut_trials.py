"""The students of trials the time budget cut: restored from their last checkpoint, scored, logged.

A trial logs its kept student (the best epoch's, chosen on validation) to its MLflow run when it
reaches its last epoch. A trial that the search's time budget cut never gets there, so a search
whose every trial was cut (a slow teacher, a short budget) would end with no champion and no
test accuracy, though its trials trained for minutes. Their latest checkpoints hold those
students: the driver restores each, scores it once on the test split and logs it to the trial's
child run, and the champion is then chosen among every kept student, as always on validation.

Only trials that trained in their own process (one worker on a local Ray, tune/trial_process.py)
leave checkpoints in this layout; a Ray Train trial's cut student is not recovered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

from lrra.config import LRRAConfig
from lrra.metric_names import TEST_METRIC
from lrra.run_checkpoints import restore_from_directory
from lrra.runner import student_metadata
from lrra.splits import evaluation_splits
from lrra.teacher_files import teacher_from_payload
from lrra.tracking import TAG_MODEL_URI, TAG_TRIAL_ID
from lrra.tracking.student import log_student_model
from lrra.train import Distiller
from tune.search_tracking import child_runs
from tune.study import TIME_BUDGET
from tune.trial_process import checkpoint_folders


def keep_cut_students(client: MlflowClient, parent_run_id: str, rows: list[dict[str, Any]], base: LRRAConfig,
                      knobs: list[str], teacher_payload: Any, teacher_meta: dict[str, Any]) -> int:
    """Log the kept student of every trial the time budget cut that has a checkpoint and no logged
    student yet; its row gains the student's test accuracy. Returns how many were logged.

    ``teacher_payload``/``teacher_meta``: what the trials got (tune/trial.py's TrialSetup); the
    teacher and the real splits are opened only when a trial needs them."""
    if not any(row["stop_reason"] == TIME_BUDGET for row in rows):
        return 0
    runs = {run.data.tags.get(TAG_TRIAL_ID): run for run in child_runs(client, parent_run_id)}
    teacher = splits = None
    kept = 0
    for row in rows:
        run = runs.get(row["tune_trial_id"])
        if row["stop_reason"] != TIME_BUDGET or run is None or TAG_MODEL_URI in run.data.tags:
            continue
        folders = checkpoint_folders(Path(row["train_run"])) if row["train_run"] else []
        if not folders:
            continue
        cfg = base.replace(**{knob: row[knob] for knob in knobs if row.get(knob) is not None})
        if teacher is None:
            teacher = teacher_from_payload(teacher_payload, teacher_meta, base)
            splits = evaluation_splits(base, teacher_meta)
        distiller = Distiller(cfg, teacher, splits, device=torch.device("cpu"), teacher_meta=teacher_meta)
        restore_from_directory(distiller, folders[-1], world=1, shown_as=str(folders[-1]))
        if distiller.best_epoch < 0:
            continue
        meta = student_metadata(distiller, teacher_meta, cut_by="time budget")  # scores the test split once
        log_student_model(client, run.info.run_id, distiller.best_student_model(), meta)
        client.log_metric(run.info.run_id, TEST_METRIC, meta["test_accuracy"], step=distiller.epoch)
        row["test_acc"] = meta["test_accuracy"]
        kept += 1
    return kept
