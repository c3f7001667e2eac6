"""One Tune trial: a Tune function that runs the LRRA Distiller, in its own process or under Ray Train.

- One worker on a local Ray (the default search on one machine): the trial's own process trains
  (tune/trial_process.py). It reserves the worker's CPUs and GPU itself and starts in seconds.
- Several workers, or any trial on a cluster: the Ray Train V2 pattern (``Tuner(trainer)`` is
  deprecated). The trial function builds a ``TorchTrainer`` with ``TuneReportCallback`` and calls
  ``fit()``; it only drives, and the work happens in the trainer's workers, which reserve their
  own CPUs/GPUs on the GPU nodes while the trial's process stays on the head. A GPU trial trains
  for hours, so the ~20 s the worker group takes to start weighs little there, and Ray Train
  restarts a lost node's workers from their checkpoint.

Where things happen, for whoever extends a trial:
- trial start: the top of ``run_trial`` (in the trial's process);
- every epoch: ``EpochReport.after_report`` (tune/epoch_report.py, in the trial's Ray Train controller), right
  before the metrics reach Tune, ASHA and Optuna; in a trial that trains in its own process,
  ``trial_process.tune_report``;
- trial end: after ``trainer.fit()`` returns. A trial that ASHA or the time budget stops is
  killed instead and never gets there: the driver-side Tune callbacks see every end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray.tune

from lrra.config import LRRAConfig
from lrra.distributed import build_trainer, run_loop_config
from lrra.tracking import RunTarget
from tune.cluster import driver_resources
from tune.epoch_report import EpochReport
from tune.study import OPTUNA_NUMBER
from tune.trial_process import run_in_trial_process


@dataclass
class TrialSetup:
    """What every trial shares; Tune ships it once through the object store (tune.with_parameters)."""

    config: dict[str, Any]                 # the base LRRAConfig; the trial's knobs override it
    teacher_payload: Any                   # lrra.teacher_files.teacher_payload: a state_dict or a file's bytes
    teacher_meta: dict[str, Any]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    train_path: str                        # Ray Train storage for the trials' runs
    tracking: RunTarget | None = None      # the search's MLflow parent run; each trial logs a child run
    # Tune trial id -> stored last result, for the trials the study already finished (a resumed
    # search whose driver was killed before Tune saved their end): they must not run again.
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_failures: int = 0                  # worker-group restarts from the last checkpoint (a lost node)
    search_name: str = "unnamed-search"    # tags the workers' live metrics (lrra/live_metrics.py)
    in_process: bool = False               # train in the trial's own process (see trains_in_process)


def trains_in_process(workers: int, on_cluster: bool) -> bool:
    """Whether a trial trains in its own process: one worker, and a local Ray (see the module's docstring)."""
    return workers == 1 and not on_cluster


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: the base configuration with this trial's knobs, under Ray Train.

    The Ray Train run is named after the Tune trial id: when a resumed search restarts an
    unfinished trial, Ray Train finds that run and continues it from its latest checkpoint.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    if trial_id in setup.finished:
        ray.tune.report(setup.finished[trial_id])  # Tune then ends the trial with its real last result
        return
    knobs = {name: value for name, value in config.items() if name != OPTUNA_NUMBER}
    cfg = LRRAConfig.from_dict({**setup.config, **knobs})
    tracking = setup.tracking.for_trial(trial_id, config.get(OPTUNA_NUMBER)) if setup.tracking else None
    if setup.in_process:
        run_in_trial_process(run_loop_config(cfg, setup.teacher_payload, setup.teacher_meta, tracking,
                                             storage_path=setup.train_path, name=trial_id, search=setup.search_name),
                             gpu=setup.gpus_per_worker > 0)
        return
    trainer = build_trainer(
        cfg, setup.teacher_payload, setup.teacher_meta, workers=setup.workers,
        use_gpu=setup.gpus_per_worker > 0,
        resources_per_worker=worker_resources(setup.cpus_per_worker, setup.gpus_per_worker),
        storage_path=setup.train_path, name=trial_id, max_failures=setup.max_failures, callbacks=[EpochReport()],
        tracking=tracking, search=setup.search_name)
    trainer.fit()


def worker_resources(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus > 0 else {"CPU": cpus}


# What a trial's own process reserves besides its CPUs: the memory it holds (a Tune function with
# the teacher and a Ray Train controller; about 0.9 GB resident was seen on the CPU dev box). It
# also keeps the reservation non-empty with --driver-cpus 0, which Ray Tune requires.
DRIVER_MEMORY_BYTES = 512 * 1024**2


def trainable(setup: TrialSetup, driver_cpus: float):
    """``run_trial`` with its setup attached and the trial process's own resources declared.

    Only the trial's process is declared here (by default no CPU: it waits on its Ray Train run,
    whose controller reserves none either, so a 2-core machine runs two single-thread trials
    rather than one trial beside an idle core; and DRIVER_MEMORY_BYTES of memory); the Ray Train
    workers reserve theirs when the trainer starts. On a cluster whose head advertises
    tune/cluster.py's DRIVER_RESOURCE, the trial's process also takes one unit of it, so it runs
    on the head (its Ray Train controller follows it there).

    A trial that trains in its own process is its worker: it reserves the worker's CPUs and GPU
    (``driver_cpus`` does not apply).
    """
    if setup.in_process:
        resources = {"memory": DRIVER_MEMORY_BYTES, **worker_resources(setup.cpus_per_worker, setup.gpus_per_worker)}
    else:
        resources = {"CPU": driver_cpus, "memory": DRIVER_MEMORY_BYTES, **driver_resources(ray.cluster_resources())}
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), resources)
