"""What a training process logs while it trains: per-epoch metrics, image grids, system metrics.

RunTracker gathers them, plus the best student at the end, for one run; targets.py opens and
ends that run around the training.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from torch import nn

from lrra.config import LRRAConfig
from lrra.data import dataset_info
from lrra.logs import core as logger
from lrra.splits import EvaluationSplits
from lrra.tracking.runs import TAG_MODEL_URI, end_run, tag_failure
from lrra.tracking.student import log_student_model
from lrra.train import Distiller

IMAGE_EVERY = 5                                  # epochs between two generated-image grids
IMAGE_GRID_SAMPLES = 64
IMAGE_KEY = "generated"                          # the grids' key: MLflow shows them by step (epoch)
LABELLED_TILE = 32                               # tiles are upscaled to at least this side to carry a label


class RunTracker:
    """What one run logs while a Distiller trains: metrics, image grids, system metrics, the student.

    Created on the process that trains (rank 0 under Ray Train). Epochs already in the run are not
    logged again: a resumed run re-trains, bit for bit, the epochs after its last checkpoint.

    A run that fails late (e.g. a non-finite loss) may still log its best-so-far student and say
    why it failed (``tag_failure``) before the error leaves tracked_run, which ends it FAILED.
    """

    def __init__(self, client: MlflowClient, run_id: str, cfg: LRRAConfig, teacher_meta: dict[str, Any]) -> None:
        self.client, self.run_id, self.cfg = client, run_id, cfg
        self.mean, self.std = normalisation(teacher_meta, cfg)
        self.logged_through = last_logged_epoch(client, run_id)
        self._system_metrics = start_system_metrics(run_id, client.tracking_uri)

    def on_epoch(self, metrics: dict[str, float], distiller: Distiller) -> None:
        epoch = int(metrics["epoch"])
        if epoch <= self.logged_through:
            return
        if self.logged_through < 0 and distiller.evaluation is not None:  # a fresh run: once
            log_evaluation_inputs(self.client, self.run_id, self.cfg, distiller.evaluation)
        log_epoch_metrics(self.client, self.run_id, metrics)
        if image_due(epoch, self.cfg.epochs):
            grid = generated_image_grid(distiller.generator, self.cfg.latent_dim, self.mean, self.std,
                                        seed=self.cfg.seed, teacher=distiller.teacher)
            self.client.log_image(self.run_id, grid, key=IMAGE_KEY, step=epoch + 1)  # steps count epochs from 1
        self.logged_through = epoch

    def has_logged_student(self) -> bool:
        """True once the run holds its best student (a restarted, already finished run may)."""
        return TAG_MODEL_URI in self.client.get_run(self.run_id).data.tags

    def log_student(self, model: nn.Module, student_meta: dict[str, Any]) -> str:
        """Log the best student as this run's MLflow model; returns its model URI."""
        return log_student_model(self.client, self.run_id, model, student_meta)

    def tag_failure(self, reason: str) -> None:
        """Record why this run failed (tag ``lrra.failure``); the run still ends as its block exits."""
        tag_failure(self.client, self.run_id, reason)

    def end(self, error: BaseException | None = None) -> None:
        try:
            if self._system_metrics is not None:
                finish_system_metrics(self._system_metrics)
        finally:  # a sampler that fails to stop must not leave the run RUNNING
            end_run(self.client, self.run_id, error)


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    """The last epoch already in the run, as the Distiller counts it (0-based; -1 if none)."""
    return max((int(m.step) - 1 for m in client.get_metric_history(run_id, "epoch")), default=-1)


def log_epoch_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """All of one epoch's metrics in one request, at step = epochs done (1-based), and ``epoch`` as
    that count: epoch 3 is step 3 in MLflow, in Optuna and in the progress lines ("epoch 3/30")."""
    done, now = int(metrics["epoch"]) + 1, int(time.time() * 1000)
    values = {**metrics, "epoch": done}
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, done) for key, value in values.items()])


# How a unique-constraint violation reads in MLflow's message: SQLite and MySQL through
# SQLAlchemy's IntegrityError, PostgreSQL as psycopg's UniqueViolation.
UNIQUE_VIOLATIONS = ("IntegrityError", "UniqueViolation")


def log_evaluation_inputs(client: MlflowClient, run_id: str, cfg: LRRAConfig, evaluation: EvaluationSplits) -> None:
    """The real images of the run, as MLflow dataset inputs: validation (it chooses) and test (it
    reports), each with its size and rule in the name. The student trains on generated images only."""
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = LocalArtifactDatasetSource(str(Path(cfg.data_dir).absolute())).to_json()
    inputs = []
    for context, split in (("validation", evaluation.validation), ("test", evaluation.test)):
        name = f"{cfg.dataset} {context} ({len(split)} images, {evaluation.rule})"
        digest = hashlib.sha256(f"{cfg.dataset}|{evaluation.rule}|{context}|{len(split)}".encode()).hexdigest()[:8]
        dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException as err:
        if not any(word in str(err) for word in UNIQUE_VIOLATIONS):
            raise
        # Trials of one experiment log the same datasets. MLflow looks a dataset up, then inserts it
        # if missing, in two steps: two trials starting together can both miss it, and the second
        # insert breaks the uniqueness of (experiment, name, digest) and is rolled back whole. The
        # dataset is there now, so logging again links it to this run.
        client.log_inputs(run_id, datasets=inputs)


def normalisation(meta: dict[str, Any], cfg: LRRAConfig) -> tuple[list[float], list[float]]:
    """(mean, std) the teacher was trained with: from its metadata, else the dataset's known values."""
    if "mean" in meta and "std" in meta:
        return list(meta["mean"]), list(meta["std"])
    info = dataset_info(cfg.dataset, cfg.data_dir)
    return list(info.mean), list(info.std)


@torch.no_grad()
def generated_image_grid(generator: nn.Module, latent_dim: int, mean: list[float], std: list[float],
                         samples: int = IMAGE_GRID_SAMPLES, seed: int = 0,
                         teacher: nn.Module | None = None) -> np.ndarray:
    """An [H, W, 3] uint8 grid of generator samples, de-normalised to pixels; with ``teacher``, each
    tile (upscaled to at least LABELLED_TILE pixels) carries the class the teacher gives it.

    The same latents every call (own RNG, seeded), so successive grids show the same samples
    evolving. A copy samples in train mode, as the student sees the images, without touching
    the real generator's BatchNorm statistics or the run's random streams (resume stays exact).
    """
    sampler = copy.deepcopy(generator).train()
    device = next(sampler.parameters()).device
    z = torch.randn(samples, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    normalised = sampler(z)
    labels = teacher(normalised).argmax(1).tolist() if teacher is not None else None
    images = normalised.float().cpu()
    images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    if labels is not None and images.shape[-1] < LABELLED_TILE:  # room for a readable label
        images = torch.nn.functional.interpolate(images, scale_factor=-(-LABELLED_TILE // images.shape[-1]),
                                                 mode="nearest")
    from torchvision.utils import make_grid  # late: see lrra/dataset_files.py on torchvision's import cost

    per_row = int(samples ** 0.5)
    grid = make_grid(images.clamp(0, 1), nrow=per_row, padding=1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return pixels if labels is None else with_labels(pixels, labels, images.shape[-1], per_row)


def with_labels(grid: np.ndarray, labels: list[int], tile: int, per_row: int) -> np.ndarray:
    """``grid`` with each tile's label written in its top-left corner, white on a black box."""
    from PIL import Image, ImageDraw  # Pillow comes with torchvision

    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for index, label in enumerate(labels):
        x, y = 1 + (index % per_row) * (tile + 1), 1 + (index // per_row) * (tile + 1)
        box = draw.textbbox((x + 1, y), str(label))
        draw.rectangle((x, y, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
        draw.text((x + 1, y), str(label), fill=(255, 255, 255))
    return np.asarray(image)


def image_due(epoch: int, epochs: int, every: int = IMAGE_EVERY) -> bool:
    """The first epoch, every ``every``-th, and the last."""
    return epoch % every == 0 or epoch == epochs - 1


def start_system_metrics(run_id: str, tracking_uri: str):
    """MLflow's CPU/memory/disk/network (and NVIDIA GPU) sampler on ``run_id``, or None without psutil.

    Sampling every 10 s unless $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise; GPU
    metrics need the nvidia-ml-py package.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:  # psutil missing: training goes on without system metrics
        return None
    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def finish_system_metrics(monitor) -> None:
    """Stop MLflow's sampler, then record one last sample of the run's end.

    The sampler logs only after a whole sampling interval and a look-up of the run, so a run shorter
    than that (or a sampler starved on a busy machine) ended with no system metrics at all.
    """
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - a last sample is not worth failing the run's end
        logger.warning("the run's last system-metrics sample was not logged: %s", err)
