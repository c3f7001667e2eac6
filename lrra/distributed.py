"""Ray Train layer: the LRRA Distiller on N workers (docs/design.md §4).

Each worker runs the plain per-rank loop of lrra/train.py; Ray adds the context (rank, world
size), the device, ``ray.train.report`` and checkpoints in Ray storage. The collectives that keep
the ranks in step without DistributedDataParallel are lrra/collectives.py; the files of a
checkpoint, lrra/run_checkpoints.py.

The checks that run before any of this (workers, storage, address, cluster size) live in
lrra/preflight.py.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from lrra import logs
from lrra.collectives import RAY_TRAIN_COLLECTIVES
from lrra.config import LRRAConfig
from lrra.fault_injection import Faults, InjectedFault
from lrra.library_hooks import ray_train_report_logger
from lrra.live_metrics import DISTILL_SEARCH, WorkerMetrics
from lrra.metric_names import DIVERGED_KEY
from lrra.preflight import (
    check_address,
    check_cluster_fits,
    check_fault_switch,
    check_storage,
    check_workers,
    start_ray,
    worker_resources,
)
from lrra.run_checkpoints import (
    BEST_STUDENT_FILE,
    CHECKPOINTS_KEPT,
    checkpoint_due,
    restore_from_directory,
    save,
    write_teacher_file,
)
from lrra.runner import (
    RunDiverged,
    default_run_name,
    diverged_message,
    format_progress,
    student_metadata,
)
from lrra.splits import evaluation_splits
from lrra.teacher import prepare_teacher
from lrra.teacher_files import teacher_from_payload, teacher_label, teacher_payload
from lrra.train import Distiller, NonFiniteLossError

# Key of each epoch's report (not of MLflow's metrics): the node rank 0 trains on, for the search's view.
RANK0_NODE = "rank0_node_ip"

if TYPE_CHECKING:
    from lrra.tracking import RunTarget

# In a worker, Ray Train tees print() into its logger (each line would show twice): log instead,
# through the handlers Ray Train sets up there (train_worker defers to them).
logger = logs.ray_train


def train_loop_config(cfg: LRRAConfig, teacher_payload: Any,
                      teacher_meta: dict[str, Any], tracking: RunTarget | None = None) -> dict[str, Any]:
    """What every worker receives. The teacher travels by value (Ray's object store), not as a
    path: on a multi-node cluster a driver-side file does not exist on the workers. Its payload
    (lrra.teacher_files.teacher_payload) is a state_dict, or a compiled teacher's file bytes.
    ``tracking`` says where rank 0 logs to MLflow (None: nowhere). The tests' faults, if any, are
    read from this process's environment, checked, and travel with it."""
    return {"cfg": cfg.to_dict(), "teacher_payload": teacher_payload, "teacher_meta": teacher_meta,
            "tracking": tracking, "faults": check_fault_switch(cfg).to_dict()}


def run_loop_config(cfg: LRRAConfig, teacher_payload: Any, teacher_meta: dict[str, Any],
                    tracking: RunTarget | None, *, storage_path: str, name: str, search: str) -> dict[str, Any]:
    """``train_loop_config`` plus where the run keeps its files and how its live metrics are tagged."""
    return {**train_loop_config(cfg, teacher_payload, teacher_meta, tracking),
            "run_path": f"{storage_path.rstrip('/')}/{name}", "metric_tags": {"search": search, "trial": name}}


def use_assigned_cpus() -> None:
    """As many torch threads as CPUs reserved for this worker (at least one).

    Ray already exports OMP_NUM_THREADS so, but only if the variable was unset where Ray started;
    a worker that kept the user's value (or torch's default of every core) would oversubscribe the
    cores that the search gave to the other trials' workers.
    """
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def worker_distiller(config: dict[str, Any]) -> Distiller:
    """This rank's Distiller: Ray's device, the collectives above, validation and test splits on rank 0."""
    cfg = LRRAConfig.from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    evaluation = evaluation_splits(cfg, config["teacher_meta"]) if rank == 0 else None
    teacher = teacher_from_payload(config["teacher_payload"], config["teacher_meta"], cfg)
    return Distiller(cfg, teacher, evaluation, device=ray.train.torch.get_device(), rank=rank,
                     collectives=RAY_TRAIN_COLLECTIVES, faults=Faults(**config["faults"]),
                     teacher_meta=config["teacher_meta"])


def restore(distiller: Distiller, checkpoint: ray.train.Checkpoint) -> None:
    """Load the shared state and this rank's own shard from a checkpoint written by save()."""
    with checkpoint.as_directory() as directory:
        restore_from_directory(distiller, Path(directory), dist.get_world_size(), checkpoint.path)


def maybe_inject_fault(faults: Faults, epoch: int, rank: int, resumed: bool) -> None:
    """The test-only fault: rank 0 fails at the start of ``fault_at_epoch``, in a fresh group only."""
    if not faults.fails(epoch, resumed):
        return
    # All ranks wait here first, so every rank's report of the previous epoch is queued and its
    # checkpoint registered: the restarted group then resumes exactly at this epoch.
    dist.barrier()
    if rank == 0:
        raise InjectedFault(f"fault_at_epoch={epoch}: rank 0 fails on purpose (test-only switch)")


def rank0_tracking(config: dict[str, Any], distiller: Distiller):
    """Rank 0's MLflow run context (yields a lrra.tracking.RunTracker); a no-op elsewhere."""
    target = config.get("tracking")
    if target is None or distiller.rank != 0:
        return nullcontext()
    from lrra.tracking import tracked_worker  # MLflow is imported only where it logs

    return tracked_worker(target, distiller.cfg, config["teacher_meta"])


NODE_IP_TAG, NODE_ID_TAG, NODE_HISTORY_TAG = "lrra.node.ip", "lrra.node.id", "lrra.node.ips"


def tag_node(run) -> None:
    """Rank 0's node on its MLflow run: where the run trains now, and every node rank 0 ran on, in order.

    Set by each worker group that starts, so a run restarted on another node after losing one
    shows both (``lrra.node.ips``, comma-separated).
    """
    ip, node_id = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    history = run.client.get_run(run.run_id).data.tags.get(NODE_HISTORY_TAG)
    run.client.set_tag(run.run_id, NODE_IP_TAG, ip)
    run.client.set_tag(run.run_id, NODE_ID_TAG, node_id)
    run.client.set_tag(run.run_id, NODE_HISTORY_TAG, f"{history},{ip}" if history else ip)


def worker_metrics(config: dict[str, Any], rank: int) -> WorkerMetrics:
    """This worker's live metrics (lrra/live_metrics.py), tagged with its search, trial and rank."""
    tags = config["metric_tags"]
    return WorkerMetrics(tags["search"], tags["trial"], rank)


def run_epochs(distiller: Distiller, config: dict[str, Any], run, resumed: bool) -> None:
    """Train to the last epoch, reporting every epoch from every rank and checkpointing when due."""
    cfg, rank = distiller.cfg, distiller.rank
    live, node_ip = worker_metrics(config, rank), ray.util.get_node_ip_address()
    while distiller.epoch < cfg.epochs:
        maybe_inject_fault(distiller.faults, distiller.epoch, rank, resumed)
        metrics = distiller.train_epoch()
        live.export(metrics, distiller.rank_metrics, cfg.memory_capacity, cfg.iters_per_epoch * cfg.kd_steps,
                    distiller.device)
        if rank == 0:
            logger.info(format_progress(metrics, cfg.epochs))
        if run is not None:
            run.on_epoch(metrics, distiller)  # before the report, after which a scheduler may stop the trial
        report = {**metrics, RANK0_NODE: node_ip} if rank == 0 else metrics
        if not checkpoint_due(cfg, distiller.epoch):
            ray.train.report(report)  # V2: every rank reports, every epoch (it is a barrier)
            continue
        with tempfile.TemporaryDirectory(prefix="lrra-checkpoint-") as directory:
            save(distiller, Path(directory), config["teacher_meta"])
            # Only rank 0's metrics are attached to the checkpoint; the name is shared by all ranks.
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}")


def keep_best_student(distiller: Distiller, config: dict[str, Any], run) -> None:
    """Rank 0: the best student so far as ``best_student.pt`` in the run's folder, and as the run's model."""
    if distiller.rank != 0 or distiller.best_epoch < 0:
        return
    meta, model = student_metadata(distiller, config["teacher_meta"]), distiller.best_student_model()
    write_teacher_file(model, meta, f"{config['run_path']}/{BEST_STUDENT_FILE}")
    if run is not None:
        run.log_student(model, meta)


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's "Reporting training result ..." INFO line, one per rank and epoch.

    Ray 2.60 names that logger after its file path, not "ray.train...", so the run's
    LoggingConfig(log_level="WARNING") does not reach it and each line repeats every metric.
    """
    report_logger = ray_train_report_logger()
    if report_logger is not None:  # None: another Ray layout, nothing to quiet
        report_logger.setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train function: one rank's Distiller, reporting every epoch from every rank.

    A run whose loss goes non-finite keeps its best student (file and logged model), ends its
    MLflow run FAILED, reports its last good epoch once more with ``diverged`` = 1 and returns:
    restarting it would only diverge again.
    """
    quiet_ray_train_reports()
    logs.defer_to_process_logging()
    use_assigned_cpus()
    distiller = worker_distiller(config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restore(distiller, checkpoint)
    resumed = checkpoint is not None
    if resumed and distiller.epoch >= distiller.cfg.epochs:
        # The run had finished, but whoever started it never saw the end (a search driver killed
        # after the last checkpoint): tell it again, without training.
        log_a_finished_runs_student(distiller, config)
        ray.train.report(distiller.last_metrics)
        return distiller.summary() if distiller.rank == 0 else None

    diverged = None
    try:
        with rank0_tracking(config, distiller) as run:
            if run is not None:
                tag_node(run)
            with keeping_the_best_if_diverged(distiller, config, run):
                run_epochs(distiller, config, run, resumed)
            keep_best_student(distiller, config, run)
    except RunDiverged as error:
        diverged = str(error)
        if distiller.rank == 0:
            logger.warning(diverged)
        ray.train.report({**distiller.last_metrics, DIVERGED_KEY: 1})
    if distiller.rank != 0:
        return None
    return {**distiller.summary(), **({DIVERGED_KEY: diverged} if diverged else {})}


def log_a_finished_runs_student(distiller: Distiller, config: dict[str, Any]) -> None:
    """A finished run started again: its student is logged unless the run already holds it (the
    driver may have been killed before that)."""
    with rank0_tracking(config, distiller) as run:
        if run is not None and not run.has_logged_student():
            keep_best_student(distiller, config, run)


@contextmanager
def keeping_the_best_if_diverged(distiller: Distiller, config: dict[str, Any], run) -> Iterator[None]:
    """Around the epochs: a loss gone non-finite keeps the best student so far (file and logged
    model), says why on the MLflow run, and raises RunDiverged, which ends that run FAILED."""
    try:
        yield
    except NonFiniteLossError as error:
        message = diverged_message(error, distiller, f"{config['run_path']}/{BEST_STUDENT_FILE}")
        keep_best_student(distiller, config, run)
        if run is not None:
            run.tag_failure(message)
        raise RunDiverged(message, {}) from error


# ----------------------------------------------------------------------------------------
# Driver side: validation, trainer, run.


def build_trainer(cfg: LRRAConfig, teacher_payload: Any, teacher_meta: dict[str, Any], *,
                  workers: int, use_gpu: bool = False, resources_per_worker: dict[str, float] | None = None,
                  storage_path: str, name: str, max_failures: int = 0,
                  callbacks: list | None = None, tracking: RunTarget | None = None,
                  search: str = DISTILL_SEARCH) -> TorchTrainer:
    """A TorchTrainer running ``train_worker`` on ``workers`` ranks (gloo on CPUs, NCCL on GPUs).

    Pure builder: nothing is checked against the cluster or storage (see lrra/preflight.py). A
    ``name`` that already exists under ``storage_path`` resumes that run. ``cfg``'s paths must be
    absolute already (``LRRAConfig.with_absolute_paths`` on the driver): this may run in a Tune
    trial, whose working folder belongs to one Ray session. The workers' live metrics are tagged
    with ``search`` and, as the trial, ``name`` (a search names each run after its Tune trial id).
    """
    check_workers(workers)
    check_fault_switch(cfg)
    if not os.path.isabs(cfg.data_dir):
        raise ValueError(f"build_trainer needs an absolute data_dir, got {cfg.data_dir!r}: resolve it on the driver")
    return TorchTrainer(
        train_worker,
        train_loop_config=run_loop_config(cfg, teacher_payload, teacher_meta, tracking,
                                          storage_path=storage_path, name=name, search=search),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(use_gpu, resources_per_worker)),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                             # Ray Train's INFO lines repeat every rank's full metrics each epoch.
                             logging_config=LoggingConfig(log_level="WARNING"),
                             callbacks=callbacks),
    )


def run_distributed(cfg: LRRAConfig, *, workers: int, use_gpu: bool = False, storage_path: str,
                    name: str | None = None, max_failures: int = 0, address: str | None = None,
                    callbacks: list | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Distil with Ray Train; returns the run's summary (what the CLI prints as JSON).

    Every check that can fail on bad input runs before any training: workers, storage, cluster
    resources, dataset, teacher. Without ``address`` a private local Ray is started (and stopped).
    With ``tracking_uri`` (already checked), rank 0 logs the run to MLflow.
    """
    check_workers(workers)
    check_fault_switch(cfg)
    cfg = cfg.with_absolute_paths()
    storage = check_storage(storage_path)
    if address:
        check_address(address)
    name = name or default_run_name(cfg)
    teacher, teacher_meta, teacher_path, evaluation = prepare_teacher(cfg)
    logger.info(evaluation.describe())
    started_ray = not ray.is_initialized()
    if started_ray:
        start_ray(address)
    try:
        check_cluster_fits(workers, worker_resources(use_gpu))
        with tracked_target(tracking_uri, cfg) as target:
            trainer = build_trainer(cfg, teacher_payload(teacher, teacher_meta, teacher_path), teacher_meta,
                                    workers=workers, use_gpu=use_gpu,
                                    storage_path=storage, name=name, max_failures=max_failures,
                                    callbacks=callbacks, tracking=target)
            logger.info(f"distilling {teacher_label(teacher_meta, teacher_path)} -> {cfg.student_arch} on "
                        f"{cfg.dataset} with {workers} "
                        f"Ray Train worker(s); storage {storage}/{name}")
            start = time.perf_counter()
            result = trainer.fit()
            summary = {
                "preset": cfg.preset,
                "teacher_acc": teacher_meta["val_accuracy"],
                **result.return_value,
                "workers": workers,
                "wall_s": round(time.perf_counter() - start, 2),
                "checkpoint": f"{storage.rstrip('/')}/{name}/{Path(result.checkpoint.path).name}"
                              if result.checkpoint else None,
                "best_student": f"{storage.rstrip('/')}/{name}/{BEST_STUDENT_FILE}",
                **({"mlflow_run_id": target.run_id} if target else {}),
            }
            if DIVERGED_KEY in summary:
                # Raised inside the block, so that the driver's end of the MLflow run says FAILED too.
                raise RunDiverged(summary[DIVERGED_KEY], summary)
    finally:
        if started_ray:
            ray.shutdown()
    return summary


def tracked_target(tracking_uri: str | None, cfg: LRRAConfig):
    """A new MLflow run for the workers to log to (lrra.tracking.distill_target), or no tracking."""
    if tracking_uri is None:
        return nullcontext()
    from lrra.tracking import distill_target

    return distill_target(tracking_uri, cfg)
