"""``python -m lrra export``: the chosen student in the formats users deploy.

The student comes from a run folder (its ``best_student.pt``), a student file, or an MLflow model
URI (``models:/lrra-mnist-student@champion``, ``runs:/ID/student``). It is written as a
torch.export archive (``.pt2``), ONNX (``.onnx``; needs the ``export`` extra) or TorchScript
(``.ts``), with a batch dimension of any size, then loaded back from the written file and run
on random images of the teacher's contract: the logits must match the student's to ``TOLERANCE``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrra.config import ConfigError
from lrra.external_models import TappedClassifier
from lrra.models import build_classifier
from lrra.teacher_files import TeacherError, first_line

FORMATS = {"export": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}
TOLERANCE = 1e-4  # max |logit difference| between the exported file and the student, float32 on the CPU
CHECK_BATCH = 5   # not the batch the program was traced with: the batch dimension must really be free


class LogitsOnly(nn.Module):
    """The student's plain ``forward(images) -> logits``, the signature every exporter wants."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student.net if isinstance(student, TappedClassifier) else student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


def load_student(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a run folder, a student file or an MLflow model URI, and its metadata."""
    if "://" in source or source.startswith(("models:/", "runs:/")):
        return _mlflow_student(source)
    path = Path(source)
    if path.is_dir():
        path = path / "best_student.pt"
    if not path.is_file():
        raise ConfigError(f"export: {source} is neither a run folder with best_student.pt, a student file, "
                          "nor an MLflow model URI (models:/NAME@ALIAS, runs:/ID/student)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same here
        raise TeacherError(f"export: {path} is not a readable student file ({first_line(err)})") from None
    if not (isinstance(blob, dict) and isinstance(blob.get("meta"), dict) and "state_dict" in blob):
        raise TeacherError(f"export: {path} is not a student file of this project (expected 'state_dict' and 'meta')")
    meta = blob["meta"]
    model = build_classifier(meta["arch"], meta["num_classes"], meta["channels"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


def _mlflow_student(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    import mlflow.pytorch

    from lrra.tracking.student import logged_student_meta

    meta = logged_student_meta(uri)
    program = mlflow.pytorch.load_model(uri)  # a torch.export program: its weights keep their names
    model = build_classifier(meta["arch"], meta["num_classes"], meta["channels"])
    model.load_state_dict(program.state_dict())
    return model.eval(), meta


def example_images(meta: dict[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    """Random images of the contract's shape (already normalised: what the student takes)."""
    shape = (batch, meta["channels"], meta["image_size"], meta["image_size"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def export_student(model: nn.Module, meta: dict[str, Any], fmt: str, out: Path) -> Path:
    """Write the student in ``fmt`` to ``out`` (atomically); returns the path."""
    if fmt not in FORMATS:
        raise ConfigError(f"export: --format {fmt!r} is not one of {sorted(FORMATS)}")
    module = LogitsOnly(model).eval()
    example = (example_images(meta, 2),)
    batch = torch.export.Dim("batch", min=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "export":
        torch.export.save(torch.export.export(module, example, dynamic_shapes=({0: batch},)), tmp)
    elif fmt == "torchscript":
        # Traced, not scripted: the built-in networks' forward returns a tuple or a tensor, which the
        # script compiler refuses; a trace records the logits path, and the round trip checks it at
        # another batch size.
        torch.jit.save(torch.jit.trace(module, example), tmp)
    else:
        _require_onnx()
        program = torch.onnx.export(module, example, dynamic_shapes=({0: batch},), input_names=["images"],
                                    output_names=["logits"], dynamo=True)
        program.save(str(tmp))
    tmp.replace(out)
    return out


def reloaded_logits(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The written file, loaded back by its own runtime, applied to ``images``."""
    if fmt == "export":
        return torch.export.load(path).module()(images)
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(path.read_bytes()))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


@torch.no_grad()
def check_round_trip(model: nn.Module, meta: dict[str, Any], fmt: str, path: Path) -> float:
    """Max |logit difference| between the student and its exported file, on CHECK_BATCH random images."""
    images = example_images(meta, CHECK_BATCH, seed=1)
    expected = LogitsOnly(model).eval()(images)
    difference = (reloaded_logits(fmt, path, images) - expected).abs().max().item()
    if not difference <= TOLERANCE:
        raise RuntimeError(f"export: {path} gives logits {difference:.2e} away from the student's "
                           f"(tolerance {TOLERANCE:g}); the file is kept for inspection")
    return difference


def _require_onnx() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"export --format onnx needs {', '.join(missing)}: pip install 'lrra[export]'")

