"""MLflow tracking: runs, per-epoch metrics, generated images, the best student and its registry alias.

Every run is addressed by its id through ``MlflowClient``, never through mlflow's active-run
stack: a search's parent run belongs to the driver, while each trial's child run is opened by
the trial's process and written by its Ray Train rank-0 worker, possibly on another node. A
child run carries the ``mlflow.parentRunId`` tag and is found again by its Tune trial id
(``lrra.trial_id``), so a resumed trial continues its own run.

Stores: ``sqlite:///mlflow.db`` in the working directory by default (one machine), or a tracking
server (``http://HOST:PORT``) that every node of a cluster can reach. A server is probed with one
short HTTP request before anything starts: MLflow's own client retries for minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import torchvision.utils
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import nn

from lrra.config import ConfigError, LRRAConfig
from lrra.data import dataset_info, load_split
from lrra.teacher import default_teacher_path
from lrra.train import Distiller, accuracy, resolve_device

SQLITE = "sqlite:///"
DEFAULT_TRACKING_URI = SQLITE + "mlflow.db"
DISTILL_EXPERIMENT = "lrra-distill"
SEARCH_EXPERIMENT = "lrra-search"

TAG_KIND = "lrra.kind"                           # "distill", "search" or "trial"
TAG_SEARCH = "lrra.search"                       # the search's experiment path: finds its parent run on --resume
TAG_TRIAL_ID = "lrra.trial_id"                   # the Tune trial id: finds a trial's run on resume
TAG_OPTUNA_TRIAL = "lrra.optuna_trial_number"
TAG_TEACHER_PATH = "lrra.teacher_path"
TAG_MODEL_URI = "lrra.model_uri"                 # the run's logged best student
TAG_STOP_REASON = "lrra.stop_reason"             # why a search trial ended

RUNNING, FINISHED, KILLED, FAILED = (RunStatus.to_string(s) for s in (
    RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.KILLED, RunStatus.FAILED))

SELECTION_METRIC = "eval/best_student_acc"
STUDENT_MODEL_NAME = "student"
CHAMPION_ALIAS = "champion"
VERSION_ACCURACY_TAG = "test_accuracy"           # on a registered version: what the alias compares
IMAGE_EVERY = 5                                  # epochs between two generated-image grids
IMAGE_GRID_SAMPLES = 64

SEARCH_MAX_RESULTS = 10_000                      # child runs read back at once (one per trial)
SERVER_CHECK_TIMEOUT_S = 5.0
# Defaults for MLflow's HTTP client once the server answered: fail within a minute or so instead
# of retrying for minutes (7 retries with exponential backoff). A user's own setting wins.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
VERSIONED_PACKAGES = ("lrra", "torch", "ray", "optuna", "mlflow")


class TrackingError(ConfigError):
    """The tracking store or a logged model cannot be used; the message says which and how to fix it."""


# ----------------------------------------------------------------------------------------
# Tracking URI


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ./mlflow.db; SQLite paths are made absolute.

    Absolute because Ray Train workers run in their own working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    database = sqlite_path(uri)
    return SQLITE + str(database.absolute()) if database is not None else uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI (None for any other store)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_uri(uri: str) -> None:
    """Raise TrackingError, within seconds, when the store at ``uri`` cannot be used."""
    database = sqlite_path(uri)
    if is_server(uri):
        _check_server(uri)
    elif database is not None and not database.parent.is_dir():
        raise TrackingError(f"--tracking-uri {uri}: folder {database.parent} does not exist; "
                            "create it or pick another path")


def _check_server(uri: str) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_CHECK_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise TrackingError(f"--tracking-uri {uri}: {health} answered HTTP {err.code}; is that an MLflow "
                            "tracking server?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"--tracking-uri {uri}: no MLflow tracking server reachable there ({reason}). Start one with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host HOST --port PORT`, or leave out "
            f"--tracking-uri to log to {DEFAULT_TRACKING_URI} in this folder") from None


def connect(uri: str) -> MlflowClient:
    """Point this process's MLflow at ``uri`` (model logging and registration read it) and return a client."""
    if is_server(uri):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, wherever the process runs.

    Not in ./mlruns (MLflow's default): `mlflow server` run in a folder that holds ./mlruns takes
    it for a deprecated file store. A tracking server picks its own location (None).
    """
    database = sqlite_path(uri)
    return str(database.parent / "mlartifacts" / experiment) if database is not None else None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))


# ----------------------------------------------------------------------------------------
# Runs


def version_tags() -> dict[str, str]:
    """``lrra.version.<package>`` for the packages a result depends on."""
    tags = {}
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"lrra.version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"lrra.version.{package}"] = "not installed"
    return tags


def _tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the newest run of the experiment carrying all ``tags``, or None."""
    runs = client.search_runs([experiment_id], _tag_filter(tags), max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def new_run(client: MlflowClient, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> str:
    return client.create_run(experiment_id, tags={**version_tags(), **tags}, run_name=run_name).info.run_id


def open_run(client: MlflowClient, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> str:
    """Continue the run carrying ``tags`` (back to RUNNING) or create it; returns its id."""
    run_id = find_run(client, experiment_id, tags)
    if run_id is None:
        return new_run(client, experiment_id, tags, run_name)
    client.update_run(run_id, status=RUNNING)
    return run_id


def open_search_run(client: MlflowClient, search_id: str, params: dict[str, Any], *, resume: bool = False,
                    run_name: str | None = None, experiment: str = SEARCH_EXPERIMENT) -> str:
    """The parent run of a search: a new one, or with ``resume`` the one of the same ``search_id``.

    ``search_id`` names the search uniquely (its experiment path): two searches may share a name.
    """
    experiment_id = ensure_experiment(client, experiment)
    tags = {TAG_KIND: "search", TAG_SEARCH: search_id}
    run_id = (open_run if resume else new_run)(client, experiment_id, tags, run_name or search_id)
    log_params(client, run_id, params)
    return run_id


def open_trial_run(client: MlflowClient, parent_run_id: str, trial_id: str, *,
                   optuna_trial_number: int | None = None) -> str:
    """A trial's child run under ``parent_run_id`` (named after the trial), continued when it resumes."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    tags = {TAG_KIND: "trial", MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_TRIAL_ID: trial_id}
    if optuna_trial_number is not None:
        # An Optuna trial that a resumed search runs under a new Tune trial id (the first was lost
        # with a killed driver) continues its own run: one run per Optuna trial.
        same_optuna_trial = {TAG_KIND: "trial", MLFLOW_PARENT_RUN_ID: parent_run_id,
                             TAG_OPTUNA_TRIAL: str(optuna_trial_number)}
        earlier = find_run(client, experiment_id, same_optuna_trial)
        if earlier is not None:
            client.set_tag(earlier, TAG_TRIAL_ID, trial_id)
    run_id = open_run(client, experiment_id, tags, run_name=trial_id)
    if optuna_trial_number is not None:
        client.set_tag(run_id, TAG_OPTUNA_TRIAL, str(optuna_trial_number))
    return run_id


def open_distill_run(client: MlflowClient, cfg: LRRAConfig, run_name: str | None = None) -> str:
    """A top-level run for a `distill` outside any search (always a new run)."""
    return new_run(client, ensure_experiment(client, DISTILL_EXPERIMENT), {TAG_KIND: "distill"},
                   run_name or cfg.preset)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params as strings. Re-logging an identical value (a resumed run) is accepted by MLflow."""
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


def log_run_inputs(client: MlflowClient, run_id: str, cfg: LRRAConfig, teacher_meta: dict[str, Any],
                   teacher_path: str | os.PathLike) -> None:
    """The full config as params, plus the teacher it distils."""
    log_params(client, run_id, {**cfg.to_dict(), "teacher.test_accuracy": teacher_meta["test_accuracy"]})
    client.set_tag(run_id, TAG_TEACHER_PATH, str(teacher_path))


def run_status_for(error: BaseException | None) -> str:
    """FINISHED, KILLED for an interruption (Ctrl-C, SystemExit), FAILED for any other error."""
    if error is None:
        return FINISHED
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return KILLED
    return FAILED


def end_run(client: MlflowClient, run_id: str, error: BaseException | None = None) -> None:
    client.set_terminated(run_id, run_status_for(error))


@contextmanager
def ending_with_block(end: Callable[[BaseException | None], None]) -> Iterator[None]:
    """Calls ``end(error)`` as the block exits: with the error that escapes it, else with None."""
    try:
        yield
    except BaseException as error:
        end(error)
        raise
    end(None)


@contextmanager
def ended_run(client: MlflowClient, run_id: str) -> Iterator[str]:
    """Ends ``run_id`` FINISHED, KILLED or FAILED according to how the block exits."""
    with ending_with_block(lambda error: end_run(client, run_id, error)):
        yield run_id


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    filter_string = _tag_filter({MLFLOW_PARENT_RUN_ID: parent_run_id})
    return list(client.search_runs([experiment_id], filter_string, max_results=SEARCH_MAX_RESULTS))


def end_trial_runs(client: MlflowClient, parent_run_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
    """Tag each child run with why its trial ended, and end those still RUNNING.

    ``outcomes``: Tune trial id -> (run status, stop reason). A trial that a scheduler, the time
    budget or Ctrl-C stopped had its worker killed before it could end its own run; a trial
    missing from ``outcomes`` ends KILLED.
    """
    for run in child_runs(client, parent_run_id):
        status, reason = outcomes.get(run.data.tags.get(TAG_TRIAL_ID), (KILLED, None))
        if reason is not None:
            client.set_tag(run.info.run_id, TAG_STOP_REASON, reason)
        # A trial that failed although its worker ended its run cleanly (a diverged one) ends FAILED.
        if run.info.status == RUNNING or (status == FAILED and run.info.status != FAILED):
            client.set_terminated(run.info.run_id, status)


# ----------------------------------------------------------------------------------------
# During training


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    """The last epoch already in the run (-1 if none)."""
    return max((int(m.step) for m in client.get_metric_history(run_id, "epoch")), default=-1)


def log_epoch_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """All of one epoch's metrics in one request, each at step = epoch."""
    epoch, now = int(metrics["epoch"]), int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, epoch) for key, value in metrics.items()])


def normalisation(meta: dict[str, Any], cfg: LRRAConfig) -> tuple[list[float], list[float]]:
    """(mean, std) the teacher was trained with: from its metadata, else the dataset's known values."""
    if "mean" in meta and "std" in meta:
        return list(meta["mean"]), list(meta["std"])
    info = dataset_info(cfg.dataset, cfg.data_dir)
    return list(info.mean), list(info.std)


@torch.no_grad()
def generated_image_grid(generator: nn.Module, latent_dim: int, mean: list[float], std: list[float],
                         samples: int = IMAGE_GRID_SAMPLES, seed: int = 0) -> np.ndarray:
    """An [H, W, 3] uint8 grid of generator samples, de-normalised to pixels.

    The same latents every call (own RNG, seeded), so successive grids show the same samples
    evolving. A copy samples in train mode, as the student sees the images, without touching
    the real generator's BatchNorm statistics or the run's random streams (resume stays exact).
    """
    sampler = copy.deepcopy(generator).train()
    device = next(sampler.parameters()).device
    z = torch.randn(samples, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    images = sampler(z).float().cpu()
    images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=int(samples ** 0.5), padding=1)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def image_due(epoch: int, epochs: int, every: int = IMAGE_EVERY) -> bool:
    """The first epoch, every ``every``-th, and the last."""
    return epoch % every == 0 or epoch == epochs - 1


def image_artifact(epoch: int) -> str:
    return f"images/epoch_{epoch:03d}.png"


class RunTracker:
    """What one run logs while a Distiller trains: metrics, image grids, system metrics, the student.

    Created on the process that trains (rank 0 under Ray Train). Epochs already in the run are not
    logged again: a resumed run re-trains, bit for bit, the epochs after its last checkpoint.
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
        log_epoch_metrics(self.client, self.run_id, metrics)
        if image_due(epoch, self.cfg.epochs):
            grid = generated_image_grid(distiller.generator, self.cfg.latent_dim, self.mean, self.std,
                                        seed=self.cfg.seed)
            self.client.log_image(self.run_id, grid, artifact_file=image_artifact(epoch))
        self.logged_through = epoch

    def has_logged_student(self) -> bool:
        """True once the run holds its best student (a restarted, already finished run does)."""
        return TAG_MODEL_URI in self.client.get_run(self.run_id).data.tags

    def log_student(self, model: nn.Module, student_meta: dict[str, Any]) -> str:
        """Log the best student as this run's MLflow model; returns its model URI."""
        return log_student_model(self.client, self.run_id, model, student_meta)

    def end(self, error: BaseException | None = None) -> None:
        if self._system_metrics is not None:
            self._system_metrics.finish()
        end_run(self.client, self.run_id, error)


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


@contextmanager
def tracked_run(client: MlflowClient, run_id: str, cfg: LRRAConfig, teacher_meta: dict[str, Any],
                teacher_path: str | os.PathLike) -> Iterator[RunTracker]:
    """A RunTracker on ``run_id`` (config logged), ended according to how the block exits."""
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
            client.update_run(self.run_id, status=RUNNING)  # a restarted worker group
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


# ----------------------------------------------------------------------------------------
# The student as an MLflow model


def _pinned(package: str) -> str:
    return f"{package}=={version(package).split('+')[0]}"


def log_student_model(client: MlflowClient, run_id: str, model: nn.Module, student_meta: dict[str, Any]) -> str:
    """Log ``model`` (eval mode) with signature, input example and metadata; returns the model URI.

    Saved as a torch.export program (MLflow's default, loadable without unpickling code). Its
    metadata (architecture, dataset, image size, normalisation, accuracy) lets `eval` rebuild
    the test set. ``student_meta`` is a teacher-format meta dict of the student.
    """
    model = model.cpu().eval()
    # Two images: torch.export fixes a batch dimension of size 1, and the program would then
    # accept single images only.
    example = torch.zeros(2, student_meta["channels"], student_meta["image_size"], student_meta["image_size"])
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # Created here, in the run's experiment: log_model alone would file it under the process's
    # active experiment, which on a Ray worker is MLflow's "Default".
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=STUDENT_MODEL_NAME, source_run_id=run_id,
        params={f"student.{key}": _param_text(value) for key, value in student_meta.items()},
        tags={TAG_KIND: "student"})
    info = mlflow.pytorch.log_model(
        model, name=STUDENT_MODEL_NAME, signature=signature, input_example=example.numpy(),
        # Explicit requirements: inferring them runs the model in a subprocess (~10 s).
        pip_requirements=[_pinned("torch"), _pinned("mlflow")],
        metadata={"lrra": _plain(student_meta)},
        step=max(int(student_meta.get("best_epoch", 0)), 0),  # links that epoch's metrics to the model
        model_id=logged.model_id,
        run_id=run_id,
    )
    client.set_tag(run_id, TAG_MODEL_URI, info.model_uri)
    return info.model_uri


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (the MLmodel file is YAML): paths and tensors become strings or lists."""
    return json.loads(json.dumps(meta, default=str))


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def best_logged_student(client: MlflowClient, parent_run_id: str) -> tuple[str, float] | None:
    """(model URI, test accuracy) of the search's best logged student; None if no trial logged one."""
    logged = [(run.data.metrics[SELECTION_METRIC], run.data.tags[TAG_MODEL_URI])
              for run in child_runs(client, parent_run_id)
              if TAG_MODEL_URI in run.data.tags and SELECTION_METRIC in run.data.metrics]
    if not logged:
        return None
    best_accuracy, model_uri = max(logged)
    return model_uri, best_accuracy


def register_best_student(client: MlflowClient, parent_run_id: str, preset: str) -> dict[str, Any] | None:
    """Register the search's best logged student (register_champion); None if no trial logged one."""
    best = best_logged_student(client, parent_run_id)
    return register_champion(client, preset, *best) if best is not None else None


def registered_model_name(preset: str) -> str:
    return f"lrra-{preset}-student"


def champion_accuracy(client: MlflowClient, name: str) -> float | None:
    """The test accuracy recorded on the version the champion alias points to (None: no champion)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or no such alias
        return None
    return float(champion.tags[VERSION_ACCURACY_TAG])


def register_champion(client: MlflowClient, preset: str, model_uri: str, test_accuracy: float) -> dict[str, Any]:
    """Register ``model_uri`` as a version of lrra-<preset>-student; move ``champion`` only if it beats it.

    The accuracy is recorded on the version (tag ``test_accuracy``) so later calls compare with it.
    """
    name = registered_model_name(preset)
    previous = champion_accuracy(client, name)
    model_version = mlflow.register_model(model_uri, name, tags={VERSION_ACCURACY_TAG: repr(float(test_accuracy))})
    is_champion = previous is None or test_accuracy > previous
    if is_champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, model_version.version)
    return {"name": name, "version": int(model_version.version), "champion": is_champion,
            "previous_champion_accuracy": previous}


# ----------------------------------------------------------------------------------------
# `python -m lrra eval`


class FrozenEvalModel(nn.Module):
    """A loaded torch.export program for code that toggles train/eval mode.

    The program was exported in eval mode and raises on .eval()/.train(); ``accuracy`` calls both.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> FrozenEvalModel:
        self.training = mode  # the program itself stays in the mode it was exported in
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.program(images)


def logged_student_meta(model_uri: str) -> dict[str, Any]:
    try:
        metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    except MlflowException as err:
        raise TrackingError(f"--model {model_uri}: {err.message}") from None
    if "lrra" not in metadata:
        raise TrackingError(f"--model {model_uri} is not an LRRA student (its MLmodel has no 'lrra' metadata)")
    return metadata["lrra"]


def check_model_fits(meta: dict[str, Any], cfg: LRRAConfig, model_uri: str) -> None:
    for key, field in (("dataset", "dataset"), ("image_size", "image_size"), ("channels", "channels")):
        if meta[key] != getattr(cfg, field):
            raise TrackingError(f"--model {model_uri} was distilled with {key}={meta[key]!r} but preset "
                                f"{cfg.preset!r} has {field}={getattr(cfg, field)!r}; use the matching --preset")


def evaluate_logged_student(model_uri: str, cfg: LRRAConfig) -> dict[str, Any]:
    """Load a logged student and score it on the real test set of its dataset."""
    meta = logged_student_meta(model_uri)
    check_model_fits(meta, cfg, model_uri)
    test_set = load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels)
    device = resolve_device(cfg.device)
    model = FrozenEvalModel(mlflow.pytorch.load_model(model_uri)).to(device)
    return {"model": model_uri, "arch": meta["arch"], "dataset": cfg.dataset, "test_examples": len(test_set),
            "test_accuracy": accuracy(model, test_set, device, cfg.eval_batch_size),
            "logged_accuracy": meta["test_accuracy"]}


# ----------------------------------------------------------------------------------------
# A search's parent run


class SearchTracker:
    """The driver's side of a search: its parent run, the trials' child runs at the end, the champion."""

    def __init__(self, tracking_uri: str, search_id: str, params: dict[str, Any], *, resume: bool,
                 run_name: str, tags: dict[str, str]) -> None:
        self.client = connect(tracking_uri)
        self.run_id = open_search_run(self.client, search_id, params, resume=resume, run_name=run_name)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.trial_target = RunTarget(tracking_uri, parent_run_id=self.run_id)
        self.interrupted = False

    def finish(self, study, frame, outcomes: dict[str, tuple[str, str]], preset: str,
               interrupted: bool) -> dict[str, Any] | None:
        """Settle the child runs, log the plots and the results table; register the champion when done.

        ``outcomes`` as in end_trial_runs. An interrupted search registers nothing yet: its
        resumption will. Returns register_champion's answer (None when nothing was registered).
        """
        self.interrupted = interrupted
        end_trial_runs(self.client, self.run_id, outcomes)
        log_search_plots(self.client, self.run_id, study)
        log_results_table(self.client, self.run_id, frame)
        return None if interrupted else register_best_student(self.client, self.run_id, preset)

    def end(self, error: BaseException | None = None) -> None:
        """End the parent run, and any child run still RUNNING (KILLED): nothing stays RUNNING."""
        end_trial_runs(self.client, self.run_id, {})
        status = run_status_for(error) if error is not None else KILLED if self.interrupted else FINISHED
        self.client.set_terminated(self.run_id, status)


@contextmanager
def tracked_search(tracking_uri: str, search_id: str, params: dict[str, Any], *, resume: bool, run_name: str,
                   tags: dict[str, str]) -> Iterator[SearchTracker]:
    """A SearchTracker whose runs end FINISHED, KILLED (interrupted) or FAILED as the block exits."""
    tracker = SearchTracker(tracking_uri, search_id, params, resume=resume, run_name=run_name, tags=tags)
    with ending_with_block(tracker.end):
        yield tracker


# ----------------------------------------------------------------------------------------
# Search-level pictures and table (on the parent run)


def log_search_plots(client: MlflowClient, run_id: str, study) -> list[str]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as figures.

    Importances need two or more complete trials whose parameters vary; the other plots need one.
    Returns the artifact paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {}
    if complete:
        plots["plots/optimization_history.png"] = optuna_plots.plot_optimization_history
        plots["plots/parallel_coordinate.png"] = optuna_plots.plot_parallel_coordinate
    if len(complete) >= 2 and _params_vary(complete):
        plots["plots/param_importances.png"] = optuna_plots.plot_param_importances
    for artifact_file, plot in plots.items():
        # Optuna marks its matplotlib plots experimental, and matplotlib warns about a knob
        # that all trials share: neither says anything to the person watching the search.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Attempting to set identical low and high")
            figure = plot(study).figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)
    return list(plots)


def _params_vary(trials) -> bool:
    return any(len({json.dumps(t.params.get(name), default=str) for t in trials}) > 1
               for name in trials[0].params)


def log_results_table(client: MlflowClient, run_id: str, frame, artifact_file: str = "results/trials.parquet") -> None:
    """A pandas DataFrame as a Parquet artifact of the run."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        frame.to_parquet(path)
        client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))
