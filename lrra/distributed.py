"""Ray Train layer: the LRRA Distiller on N workers (design.md section 4).

Each worker runs the plain per-rank loop of lrra/train.py; Ray adds the context (rank, world
size), the device, ``ray.train.report`` and checkpoints in Ray storage. The student and the
generator are *not* wrapped in DistributedDataParallel, which can differentiate neither
through ``torch.autograd.grad`` nor twice: each rank computes its gradients locally and
``average_gradients`` all-reduces them, flattened into one buffer, before every optimizer step.

Per rank: its own latent stream (seed + rank) and memory shard, so the effective batch is
B x workers. BatchNorm running statistics are averaged at the end of every epoch, so all ranks
hold the same model when rank 0 evaluates and when the checkpoint is written.

A checkpoint is one Ray checkpoint directory that every rank writes into (Ray merges them):
``state.pt`` (rank 0: ``Distiller.state_dict()``), ``rank_<r>.pt`` (rank r's memory shard and
random streams) and, at the last epoch, ``best_student.pt`` (a teacher-format file).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lrra.config import ConfigError, LRRAConfig
from lrra.data import load_split
from lrra.models import build_classifier
from lrra.runner import Log, default_run_name, format_progress, stderr_log
from lrra.teacher import obtain_teacher, save_teacher
from lrra.train import Distiller

STATE_FILE = "state.pt"
BEST_STUDENT_FILE = "best_student.pt"
# Only the latest checkpoint is needed to resume (the best student travels inside it); keep one
# spare so that a checkpoint being replaced is never the only one.
CHECKPOINTS_KEPT = 2
DEFAULT_RESOURCES_PER_WORKER = {"CPU": 1}
ADDRESS_TIMEOUT_S = 5.0

if TYPE_CHECKING:
    from lrra.tracking import RunTarget

# In a worker, Ray Train tees print() into its logger (each line would show twice): log instead.
logger = logging.getLogger(__name__)


class DistributedSetupError(ConfigError):
    """A distributed-run option (--workers, --storage, ...) cannot work; the message names it."""


class InjectedFault(RuntimeError):
    """The test-only fault of ``LRRAConfig.fault_at_epoch``."""


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


# ----------------------------------------------------------------------------------------
# Collectives (torch.distributed only; they run inside the Ray Train worker group).


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average same-dtype tensors across ranks, in place, with a single all_reduce.

    One flat buffer instead of one call per tensor: a ResNet has ~100 parameter tensors and
    each collective has a fixed latency. Every rank must pass the same shapes in the same order.
    """
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, averaged in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        tensor.copy_(averaged)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Distiller's ``sync_grads``: replace each gradient by its mean over ranks."""
    for p in params:
        if p.grad is None:
            # Every rank must send the same flat layout; a missing gradient is a zero one.
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in params])


def average_float_buffers(module: nn.Module) -> None:
    """Distiller's ``sync_buffers``: average BatchNorm running statistics over ranks.

    Integer buffers (num_batches_tracked) advance identically on every rank and are left alone.
    """
    all_reduce_mean_([b for b in module.buffers() if b.is_floating_point()])


def reduce_rank_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Average the per-rank losses and speeds; images/s is summed (the global throughput).

    Evaluation metrics exist on rank 0 only and pass through unchanged.
    """
    per_rank: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, {k: v for k, v in metrics.items() if k.startswith(("loss/", "perf/"))})
    reduced = dict(metrics)
    for key in per_rank[0]:
        values = [m[key] for m in per_rank]
        reduced[key] = sum(values) if key == "perf/images_per_s" else sum(values) / len(values)
    reduced["perf/workers"] = len(per_rank)
    return reduced


# ----------------------------------------------------------------------------------------
# The per-worker function.


def train_loop_config(cfg: LRRAConfig, teacher_state: dict[str, torch.Tensor],
                      teacher_meta: dict[str, Any], tracking: RunTarget | None = None) -> dict[str, Any]:
    """What every worker receives. The teacher travels by value (Ray's object store), not as a
    path: on a multi-node cluster a driver-side file does not exist on the workers. ``tracking``
    says where rank 0 logs to MLflow (None: nowhere)."""
    return {"cfg": cfg.to_dict(), "teacher_state": teacher_state, "teacher_meta": teacher_meta, "tracking": tracking}


def teacher_from_state(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    teacher = build_classifier(meta["arch"], meta["num_classes"], meta["channels"])
    teacher.load_state_dict(state)
    return teacher.eval()


def worker_distiller(config: dict[str, Any]) -> Distiller:
    """This rank's Distiller: Ray's device, gradient and buffer averaging, test set on rank 0."""
    cfg = LRRAConfig.from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    test_set = load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels) if rank == 0 else None
    return Distiller(cfg, teacher_from_state(config["teacher_state"], config["teacher_meta"]), test_set,
                     device=ray.train.torch.get_device(), rank=rank,
                     sync_grads=average_gradients, sync_buffers=average_float_buffers)


def restore(distiller: Distiller, checkpoint: ray.train.Checkpoint) -> None:
    """Load the shared state and this rank's own shard from a checkpoint written by save()."""
    rank, world = distiller.rank, dist.get_world_size()
    with checkpoint.as_directory() as directory:
        written_by = len(list(Path(directory).glob("rank_*.pt")))
        if written_by != world:
            raise DistributedSetupError(
                f"checkpoint {checkpoint.path} holds the memory shards and random streams of {written_by} "
                f"workers but this run has {world}; resume it with --workers {written_by}")
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        rank_state = torch.load(Path(directory) / rank_file(rank), map_location="cpu", weights_only=True)
    distiller.load_state_dict(state, rank_state)


def save(distiller: Distiller, directory: Path, teacher_meta: dict[str, Any]) -> None:
    """Write this rank's part of a checkpoint; Ray merges the ranks' directories."""
    torch.save(distiller.rank_state_dict(), directory / rank_file(distiller.rank))
    if distiller.rank != 0:
        return
    torch.save(distiller.state_dict(), directory / STATE_FILE)
    if distiller.epoch == distiller.cfg.epochs:
        save_teacher(distiller.best_student_model(), best_student_meta(distiller, teacher_meta),
                     directory / BEST_STUDENT_FILE)


def best_student_meta(distiller: Distiller, teacher_meta: dict[str, Any]) -> dict[str, Any]:
    """The best student's teacher-format metadata."""
    return dict(teacher_meta, arch=distiller.cfg.student_arch, test_accuracy=distiller.best_accuracy,
                best_epoch=distiller.best_epoch)


def checkpoint_due(cfg: LRRAConfig, finished_epochs: int) -> bool:
    every = cfg.checkpoint_every
    return finished_epochs == cfg.epochs or (every > 0 and finished_epochs % every == 0)


def maybe_inject_fault(cfg: LRRAConfig, epoch: int, rank: int, resumed: bool) -> None:
    """The test-only fault: rank 0 fails at the start of ``fault_at_epoch``, in a fresh group only."""
    if epoch != cfg.fault_at_epoch or resumed:
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


def last_epoch_metrics(distiller: Distiller) -> dict[str, Any]:
    """The evaluation metrics of the last epoch a restored Distiller ran (losses are not kept)."""
    accs = distiller.accuracies
    return {"epoch": distiller.epoch - 1, "eval/student_acc": accs[-1],
            "eval/best_student_acc": distiller.best_accuracy, "eval/mean_student_acc": sum(accs) / len(accs),
            "eval/best_epoch": distiller.best_epoch}


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train function: one rank's Distiller, reporting every epoch from every rank."""
    distiller = worker_distiller(config)
    cfg, rank = distiller.cfg, distiller.rank
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        restore(distiller, checkpoint)
    resumed = checkpoint is not None

    with rank0_tracking(config, distiller) as run:
        if resumed and distiller.epoch >= cfg.epochs:
            # A finished run restarted (a search driver killed before it saw the run end): report
            # the last epoch once more, so that Tune sees the trial complete without training.
            ray.train.report(last_epoch_metrics(distiller))
        while distiller.epoch < cfg.epochs:
            maybe_inject_fault(cfg, distiller.epoch, rank, resumed)
            metrics = reduce_rank_metrics(distiller.train_epoch())
            if rank == 0:
                logger.info(format_progress(metrics, cfg.epochs))
            if run is not None:
                run.on_epoch(metrics, distiller)  # before the report, after which a scheduler may stop the trial
            if not checkpoint_due(cfg, distiller.epoch):
                ray.train.report(metrics)  # V2: every rank reports, every epoch (it is a barrier)
                continue
            with tempfile.TemporaryDirectory(prefix="lrra-checkpoint-") as directory:
                save(distiller, Path(directory), config["teacher_meta"])
                # Only rank 0's metrics are attached to the checkpoint; the name is shared by all ranks.
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}")
        if run is not None and not run.has_logged_student():
            run.log_student(distiller.best_student_model(), best_student_meta(distiller, config["teacher_meta"]))
    return distiller.summary() if rank == 0 else None


# ----------------------------------------------------------------------------------------
# Driver side: validation, trainer, run.


def check_workers(workers: int) -> None:
    if workers < 1:
        raise DistributedSetupError(f"--workers {workers}: Ray Train needs at least 1 worker "
                                    "(--workers 0 runs in this process without Ray)")


def check_storage(storage: str) -> str:
    """The storage path as Ray Train wants it (absolute, or a URI); fails if it cannot be written.

    A local path is probed without leaving anything behind: its nearest existing ancestor must
    be a folder that takes a (self-deleting) file. A URI is opened with pyarrow and written to.
    """
    if "://" in storage:
        return _check_storage_uri(storage)
    path = Path(storage).expanduser().absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise DistributedSetupError(f"--storage {storage}: {ancestor} is a file, so no folder can be made there")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise DistributedSetupError(f"--storage {storage}: cannot write in {ancestor} ({err.strerror})") from None
    return str(path)


def _check_storage_uri(uri: str) -> str:
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.lrra-write-probe-{os.getpid()}"
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except Exception as err:  # noqa: BLE001 - pyarrow raises OSError, ValueError or ArrowException
        raise DistributedSetupError(f"--storage {uri}: cannot write there ({err})") from None
    return uri


def worker_resources(use_gpu: bool = False, resources_per_worker: dict[str, float] | None = None) -> dict[str, float]:
    """What one worker reserves: {"CPU": 1} by default, plus one GPU with use_gpu."""
    resources = dict(resources_per_worker or DEFAULT_RESOURCES_PER_WORKER)
    if use_gpu:
        resources.setdefault("GPU", 1)
    return resources


def check_cluster_fits(workers: int, resources: dict[str, float]) -> None:
    """Fail now, instead of Ray Train waiting forever, when the cluster cannot place the workers.

    Compares with the cluster's total resources (other jobs only delay a run); an autoscaling
    cluster that would grow on demand is not foreseen here.
    """
    needed = {k: v * workers for k, v in resources.items()}
    have = ray.cluster_resources()
    fits_a_node = any(all(node["Resources"].get(k, 0) >= v for k, v in resources.items())
                      for node in ray.nodes() if node["Alive"])
    if fits_a_node and all(have.get(k, 0) >= v for k, v in needed.items()):
        return
    has = "{" + ", ".join(f"'{k}': {have.get(k, 0):g}" for k in needed) + "}"
    raise DistributedSetupError(
        f"--workers {workers} asks for {resources} per worker, {needed} in all, but the Ray cluster has {has}"
        + ("" if fits_a_node else " and no node fits one worker")
        + "; use fewer workers or a bigger cluster (--address)")


def build_trainer(cfg: LRRAConfig, teacher_state: dict[str, torch.Tensor], teacher_meta: dict[str, Any], *,
                  workers: int, use_gpu: bool = False, resources_per_worker: dict[str, float] | None = None,
                  storage_path: str, name: str, max_failures: int = 0,
                  callbacks: list | None = None, tracking: RunTarget | None = None) -> TorchTrainer:
    """A TorchTrainer running ``train_worker`` on ``workers`` ranks (gloo on CPUs, NCCL on GPUs).

    Pure builder: nothing is checked against the cluster or storage (see check_cluster_fits and
    check_storage). A ``name`` that already exists under ``storage_path`` resumes that run.
    """
    check_workers(workers)
    _check_fault_switch(cfg)
    # Ray Train workers run in their own working directory: relative data paths would break.
    cfg = cfg.replace(data_dir=os.path.abspath(cfg.data_dir))
    return TorchTrainer(
        train_worker,
        train_loop_config=train_loop_config(cfg, teacher_state, teacher_meta, tracking),
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


def _check_fault_switch(cfg: LRRAConfig) -> None:
    # The fault fires only in a group that did not resume; with no checkpoint before the fault
    # epoch every restarted group would start fresh and fail again.
    if cfg.fault_at_epoch >= 0 and not (1 <= cfg.checkpoint_every <= cfg.fault_at_epoch):
        raise ConfigError(f"config field 'fault_at_epoch' = {cfg.fault_at_epoch} is invalid: under Ray Train it "
                          f"needs a checkpoint before it, i.e. fault_at_epoch >= checkpoint_every >= 1 "
                          f"(checkpoint_every = {cfg.checkpoint_every})")


def start_ray(address: str | None, **init_options: Any) -> None:
    """Join ``address``, or start a private local Ray: "local" starts one even when another runs here."""
    try:
        ray.init(address=address or "local", **init_options)
    except ConnectionError as err:
        raise DistributedSetupError(f"--address {address}: cannot join that Ray cluster ({err})") from None


def check_address(address: str) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connect says so in seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms that Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as err:
        raise DistributedSetupError(f"--address {address}: nothing answers there ({err})") from None


def run_distributed(cfg: LRRAConfig, *, workers: int, use_gpu: bool = False, storage_path: str,
                    name: str | None = None, max_failures: int = 0, address: str | None = None,
                    callbacks: list | None = None, tracking_uri: str | None = None,
                    log: Log = stderr_log) -> dict[str, Any]:
    """Distil with Ray Train; returns the run's summary (what the CLI prints as JSON).

    Every check that can fail on bad input runs before any training: workers, storage, cluster
    resources, dataset, teacher. Without ``address`` a private local Ray is started (and stopped).
    With ``tracking_uri`` (already checked), rank 0 logs the run to MLflow.
    """
    check_workers(workers)
    _check_fault_switch(cfg)
    storage = check_storage(storage_path)
    if address:
        check_address(address)
    name = name or default_run_name(cfg)
    started_ray = not ray.is_initialized()
    if started_ray:
        start_ray(address)
    try:
        check_cluster_fits(workers, worker_resources(use_gpu))
        load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels)  # fails early if unavailable
        teacher, teacher_meta, _ = obtain_teacher(cfg, log=log)
        with tracked_target(tracking_uri, cfg) as target:
            trainer = build_trainer(cfg, teacher.state_dict(), teacher_meta, workers=workers, use_gpu=use_gpu,
                                    storage_path=storage, name=name, max_failures=max_failures,
                                    callbacks=callbacks, tracking=target)
            log(f"distilling {cfg.teacher_arch} -> {cfg.student_arch} on {cfg.dataset} with {workers} Ray Train "
                f"worker(s) (teacher acc {teacher_meta['test_accuracy']:.4f}); storage {storage}/{name}")
            start = time.perf_counter()
            result = trainer.fit()
            wall_s = time.perf_counter() - start
    finally:
        if started_ray:
            ray.shutdown()
    return {
        "preset": cfg.preset,
        "teacher_acc": teacher_meta["test_accuracy"],
        **result.return_value,
        "workers": workers,
        "wall_s": round(wall_s, 2),
        "checkpoint": f"{storage.rstrip('/')}/{name}/{Path(result.checkpoint.path).name}",
        **({"mlflow_run_id": target.run_id} if target else {}),
    }


def tracked_target(tracking_uri: str | None, cfg: LRRAConfig):
    """A new MLflow run for the workers to log to (lrra.tracking.distill_target), or no tracking."""
    if tracking_uri is None:
        return nullcontext()
    from lrra.tracking import distill_target

    return distill_target(tracking_uri, cfg)
