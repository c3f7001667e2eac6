"""`python -m lrra export`: a student file and a logged MLflow student written as a torch.export
archive, ONNX and TorchScript; each file, loaded back by its own runtime in the test, gives the
student's logits for a batch of a size it was not traced with."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lrra.cli import main
from lrra.export import TOLERANCE
from lrra.models import build_classifier
from lrra.teacher import save_teacher

META = {"format": "lrra", "arch": "convnet_half", "dataset": "digits", "num_classes": 10, "channels": 3,
        "image_size": 12, "mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4], "test_accuracy": 0.5, "best_epoch": 0}


@pytest.fixture
def student_file(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_classifier("convnet_half", 10, 3)
    for module in model.modules():  # BatchNorm statistics that are not the defaults, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.eval()
    return save_teacher(model, META, tmp_path / "run" / "best_student.pt"), model


def load_back(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    if fmt == "export":
        return torch.export.load(path).module()(images)
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(path.read_bytes()))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


@pytest.mark.parametrize("fmt", ["export", "onnx", "torchscript"])
def test_a_run_folders_student_exports_and_loads_back_with_the_same_logits(fmt, student_file, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    path, model = student_file
    assert main(["export", str(path.parent), "--format", fmt]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = Path(result["out"])
    assert written.parent == path.parent and written.suffix == {"export": ".pt2", "onnx": ".onnx",
                                                                "torchscript": ".ts"}[fmt]
    assert result["max_logit_difference"] <= TOLERANCE and result["mean"] == META["mean"]
    images = torch.randn(7, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(load_back(fmt, written, images), model(images), atol=TOLERANCE)


def test_a_logged_student_exports_from_its_model_uri(student_file, tmp_path, capsys):
    from lrra import tracking
    from lrra.tracking.student import log_student_model

    _, model = student_file
    client = tracking.connect(tracking.resolve_tracking_uri())  # the store the command line will read
    experiment = client.create_experiment("export-test")
    run_id = client.create_run(experiment).info.run_id
    uri = log_student_model(client, run_id, model, META)
    out = tmp_path / "from-mlflow.pt2"
    assert main(["export", uri, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_logit_difference"] <= TOLERANCE
    images = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(load_back("export", out, images), model(images), atol=TOLERANCE)


def test_a_source_that_is_no_student_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing-here")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["export", str(tmp_path / "junk.pt")]) == 2
    assert "not a readable student file" in capsys.readouterr().err
