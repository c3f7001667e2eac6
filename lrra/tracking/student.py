"""The student as an MLflow model: logging it with what `eval` needs, and `python -m lrra eval`."""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from torch import nn

from lrra import library_hooks
from lrra.config import LRRAConfig
from lrra.scoring import accuracy, resolve_device
from lrra.splits import evaluation_splits
from lrra.tracking.runs import TAG_KIND, TAG_MODEL_URI
from lrra.tracking.store import TrackingError

STUDENT_MODEL_NAME = "student"


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
    # Explicit requirements: inferring them runs the model in a subprocess (~10 s); MLflow then
    # checks them against these two packages only (a scan of every installed one costs 1.7 s).
    requirements = ("torch", "mlflow")
    with library_hooks.mlflow_requirements_checked_against(requirements), warnings.catch_warnings():
        # torch.export.save (MLflow's format for the model) warns at every save that it found "no
        # complete tensor" and that this "may cause issues when your weights are not on CPU"; the
        # student logged here is always a CPU copy (Distiller.best_student_model), so it says nothing.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
        info = mlflow.pytorch.log_model(
            model, name=STUDENT_MODEL_NAME, signature=signature, input_example=example.numpy(),
            pip_requirements=[_pinned(package) for package in requirements],
            metadata={"lrra": _plain(student_meta)},
            # links the kept epoch's metrics to the model: best_epoch counts from 0, metric steps from 1
            step=max(int(student_meta.get("best_epoch", 0)), 0) + 1,
            model_id=logged.model_id,
            run_id=run_id,
        )
    client.set_tag(run_id, TAG_MODEL_URI, info.model_uri)
    return info.model_uri


def _pinned(package: str) -> str:
    return f"{package}=={version(package).split('+')[0]}"


def _plain(meta: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (the MLmodel file is YAML): paths and tensors become strings or lists."""
    return json.loads(json.dumps(meta, default=str))


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


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
    """The ``lrra`` metadata log_student_model wrote into the model's MLmodel file."""
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
    """Load a logged student and score it on the test split of its dataset (lrra/splits.py: the
    half of the official test split that validation did not use, when its teacher was not trained here)."""
    meta = logged_student_meta(model_uri)
    check_model_fits(meta, cfg, model_uri)
    test_set = evaluation_splits(cfg, meta).test
    device = resolve_device(cfg.device)
    model = FrozenEvalModel(mlflow.pytorch.load_model(model_uri)).to(device)
    return {"model": model_uri, "arch": meta["arch"], "dataset": cfg.dataset, "test_examples": len(test_set),
            "test_accuracy": accuracy(model, test_set, device, cfg.eval_batch_size),
            "logged_accuracy": meta["test_accuracy"]}
