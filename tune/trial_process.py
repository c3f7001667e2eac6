"""A one-worker trial that trains in the trial's own process, without a Ray Train worker group.

A Ray Train run starts five processes before its one worker does (controller, placement-group
cleaner, synchronisation actor, dataset manager, the worker itself): about 20 s on a 2-core
machine, longer than many digits trials train before ASHA stops them. A trial of one worker on a
local Ray needs none of them: this module runs the same per-rank loop as lrra/distributed.py's
``train_worker`` (rank 0 of a world of one, no collectives) inside the Tune trial and reports to
Tune directly.

What a Ray Train run gave, and how it is kept here:
- checkpoints: the same directories in the same place (``<train_path>/<trial id>/checkpoint_epoch_NNNN``,
  holding ``state.pt``, ``rank_0.pt`` and at the end ``best_student.pt``), written to a temporary
  name and renamed, so a killed trial never leaves half a checkpoint; the newest two are kept;
- resume (``--resume``, or a retry): the trial continues from the newest of those directories;
- retries: Tune's ``FailureConfig`` restarts the trial function (tune/search.py sets it);
- the epoch's metrics, ``epochs_done`` and rank 0's node go to Tune, ASHA and Optuna, as
  tune/epoch_report.py adds them for a Ray Train run.

Multi-worker trials, and every trial on a cluster, keep the TorchTrainer (tune/trial.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import ray
import ray.tune
import torch

from lrra import logs
from lrra.config import LRRAConfig
from lrra.distributed import (
    RANK0_NODE,
    keep_best_student,
    keeping_the_best_if_diverged,
    log_a_finished_runs_student,
    rank0_tracking,
    tag_node,
    use_assigned_cpus,
    worker_metrics,
)
from lrra.fault_injection import Faults, InjectedFault
from lrra.metric_names import DIVERGED_KEY
from lrra.run_checkpoints import CHECKPOINTS_KEPT, STATE_FILE, checkpoint_due, restore_from_directory, save
from lrra.runner import RunDiverged, format_progress
from lrra.splits import evaluation_splits
from lrra.teacher_files import teacher_from_payload
from lrra.train import Distiller
from tune.study import EPOCHS_DONE

logger = logs.search  # in a trial's process, through the logging Ray sets up there (see below)
CHECKPOINT_NAME = re.compile(r"checkpoint_epoch_(\d{4})")


def checkpoint_folders(run_path: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a complete one holds its state file)."""
    found = [p for p in run_path.glob("checkpoint_epoch_*")
             if CHECKPOINT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def write_checkpoint(distiller: Distiller, run_path: Path, teacher_meta: dict[str, Any]) -> None:
    """This epoch's checkpoint, complete or absent (written under a temporary name, then renamed);
    older ones beyond CHECKPOINTS_KEPT are removed once it is in place."""
    final = run_path / f"checkpoint_epoch_{distiller.epoch - 1:04d}"
    partial = run_path / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save(distiller, partial, teacher_meta)
    shutil.rmtree(final, ignore_errors=True)  # a retry that ran this epoch again
    partial.rename(final)
    for old in checkpoint_folders(run_path)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def run_in_trial_process(config: dict[str, Any], *, gpu: bool) -> None:
    """Train one trial here; ``config`` is lrra.distributed.run_loop_config's."""
    logs.defer_to_process_logging()
    use_assigned_cpus()
    cfg = LRRAConfig.from_dict(config["cfg"])
    device = torch.device("cuda") if gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
    teacher = teacher_from_payload(config["teacher_payload"], config["teacher_meta"], cfg)
    distiller = Distiller(cfg, teacher, evaluation_splits(cfg, config["teacher_meta"]), device=device,
                          faults=Faults(**config["faults"]), teacher_meta=config["teacher_meta"])
    run_path = Path(config["run_path"])
    saved = checkpoint_folders(run_path)
    if saved:
        restore_from_directory(distiller, saved[-1], world=1, shown_as=str(saved[-1]))
    resumed = bool(saved)
    if resumed and distiller.epoch >= cfg.epochs:
        # Finished, but the search never saw the end (its driver was killed): report it again.
        log_a_finished_runs_student(distiller, config)
        report_to_tune(tune_report(distiller.last_metrics))
        return
    try:
        with rank0_tracking(config, distiller) as run:
            if run is not None:
                tag_node(run)
            with keeping_the_best_if_diverged(distiller, config, run):
                train_and_report(distiller, config, run, run_path, resumed)
    except RunDiverged as diverged:
        logger.warning(str(diverged))
        report_to_tune({**tune_report(distiller.last_metrics), DIVERGED_KEY: 1})


def report_to_tune(metrics: dict[str, Any]) -> bool:
    """``ray.tune.report``; False when Tune stops the trial there (ASHA, the time budget, the search's
    end). Tune says so with SystemExit in this thread: not an error of the run, and not a reason to
    end its MLflow run KILLED (the search's end sets the status that the trial's outcome says)."""
    try:
        ray.tune.report(metrics)
    except SystemExit:
        return False
    return True


def train_and_report(distiller: Distiller, config: dict[str, Any], run, run_path: Path, resumed: bool) -> None:
    """Train to the last epoch, reporting each to Tune. The last epoch's student is kept (file and
    logged model) before that epoch is reported: Tune may end the trial at that report."""
    cfg = distiller.cfg
    live = worker_metrics(config, rank=0)
    while distiller.epoch < cfg.epochs:
        if distiller.faults.fails(distiller.epoch, resumed):
            raise InjectedFault(f"fault_at_epoch={distiller.epoch}: the trial fails on purpose (test-only switch)")
        metrics = distiller.train_epoch()
        live.export(metrics, distiller.rank_metrics, cfg.memory_capacity, cfg.iters_per_epoch * cfg.kd_steps,
                    distiller.device)
        logger.info(format_progress(metrics, cfg.epochs))
        if run is not None:
            run.on_epoch(metrics, distiller)  # before the report, after which a scheduler may stop the trial
        if checkpoint_due(cfg, distiller.epoch):
            write_checkpoint(distiller, run_path, config["teacher_meta"])
        if distiller.epoch == cfg.epochs:
            keep_best_student(distiller, config, run)
        if not report_to_tune(tune_report(metrics)):
            return


def tune_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """What tune/epoch_report.py makes of a Ray Train run's report: 1-based epochs done, rank 0's node."""
    return {**metrics, EPOCHS_DONE: int(metrics["epoch"]) + 1, RANK0_NODE: ray.util.get_node_ip_address()}
