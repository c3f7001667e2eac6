"""Teachers written outside this project, in the formats users have: a torch.export archive, a
TorchScript archive and a torchvision state_dict, each trained here by plain PyTorch on
scikit-learn's digits with a normalisation of the test's own choosing. Each distils through the
CLI, and the teacher accuracy it reports is the one computed here under the same contract; every
bad input fails with exit code 2, a message that names the cause, and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lrra.cli import main

SIDE = 16
MEAN, STD = (0.2, 0.3, 0.4), (0.35, 0.4, 0.45)  # not the dataset's: the contract must travel


def digits_pixels(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits split as this project documents it (stratified 80/20, seed 0), in [0, 1],
    at SIDE x SIDE, grey repeated to 3 channels: the images as the test's teachers see them."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        (digits.data / 16.0).astype("float32").reshape(-1, 1, 8, 8), digits.target, test_size=0.2,
        stratify=digits.target, random_state=0)
    images, labels = (x_train, y_train) if train else (x_test, y_test)
    images = F.interpolate(torch.from_numpy(images), size=(SIDE, SIDE), mode="bilinear", antialias=True,
                           align_corners=False)
    return images.expand(-1, 3, -1, -1), torch.from_numpy(labels).long()


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def validation_half() -> tuple[torch.Tensor, torch.Tensor]:
    """The half of the test split that chooses, for a teacher that may have seen every training image
    (the rule of lrra/splits.py: a fixed permutation of seed 0)."""
    images, labels = digits_pixels(train=False)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: len(images) // 2].sort().values
    return normalise(images[order]), labels[order]


class SmallNet(nn.Module):
    """A user's own network: convolutions with BatchNorm, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train(model: nn.Module, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    images, labels = digits_pixels(train=True)
    images = normalise(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).sum().item() / len(labels)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, tuple[Path, float]]:
    """format -> (file, validation accuracy computed here)."""
    folder = tmp_path_factory.mktemp("user-teachers")
    torch.manual_seed(0)
    small = train(SmallNet(), epochs=6)
    example = (torch.zeros(4, 3, SIDE, SIDE),)
    files = {}
    exported = torch.export.export(small, example)  # a static batch of 4: run in chunks of 4
    torch.export.save(exported, folder / "small.pt2")
    files["export"] = folder / "small.pt2"
    torch.jit.save(torch.jit.script(small), folder / "small.ts")
    files["torchscript"] = folder / "small.ts"
    torch.manual_seed(0)
    resnet = train(torchvision.models.resnet18(num_classes=10), epochs=2)
    torch.save({"epoch": 2, "model_state_dict": resnet.state_dict()}, folder / "resnet18.pt")
    files["torchvision"] = folder / "resnet18.pt"
    torch.save(small, folder / "small-module.pt")
    files["pickle"] = folder / "small-module.pt"
    val_images, val_labels = validation_half()
    small_score, resnet_score = accuracy(small, val_images, val_labels), accuracy(resnet, val_images, val_labels)
    scores = {"export": small_score, "torchscript": small_score, "torchvision": resnet_score, "pickle": small_score}
    return {fmt: (path, scores[fmt]) for fmt, path in files.items()}


def distill(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--preset", "digits", "--teacher", str(teacher), "--epochs", "1", "--out", str(out),
            "--tracking-uri", "none", "--set", f"image_size={SIDE}", "--set", "channels=3",
            "--set", f"input_mean={','.join(map(str, MEAN))}", "--set", f"input_std={','.join(map(str, STD))}",
            "--set", "iters_per_epoch=3", *extra]


@pytest.mark.parametrize("fmt", ["export", "torchscript", "torchvision"])
def test_a_users_teacher_distils_and_reports_the_accuracy_computed_here(fmt, teachers, tmp_path, capsys):
    path, expected = teachers[fmt]
    assert expected > 0.6  # the teachers really learnt the digits (chance: 0.1)
    extra = ("--set", "teacher_arch=torchvision:resnet18") if fmt == "torchvision" else ()
    code = main(distill(path, tmp_path / "run", *extra))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["teacher_acc"] == pytest.approx(expected, abs=1e-9)
    assert f"validation accuracy {expected:.4f}" in captured.err  # in the run's first lines too
    named = "torchvision:resnet18" if fmt == "torchvision" else f"{path.name} ({fmt})"
    assert f"distilling {named} -> " in captured.err  # the teacher it was given, not the preset's
    assert math.isfinite(result["best_val_acc"]) and (tmp_path / "run" / "best_student.pt").is_file()
    if fmt == "torchscript":  # no hook into a TorchScript graph: the activation term is off, and said so
        assert "activation term (w_a) is off" in captured.err
    else:
        assert "activation term" not in captured.err
    if fmt == "export":  # its BatchNorm runs on padded chunks of its one batch size: no prior, and why
        assert ("teacher was exported for one batch size (4), so its BatchNorm layers are not read: the "
                "BatchNorm-statistics prior") in captured.err


def test_check_scores_the_teacher_alone_and_writes_nothing(teachers, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, expected = teachers["torchscript"]
    command = ["check", "--preset", "digits", "--teacher", str(path), "--set", f"image_size={SIDE}",
               "--set", "channels=3", "--set", f"input_mean={','.join(map(str, MEAN))}",
               "--set", f"input_std={','.join(map(str, STD))}"]
    assert main(command) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["teacher_acc"] == pytest.approx(expected, abs=1e-9) and result["format"] == "torchscript"
    assert result["mean"] == list(MEAN) and list(tmp_path.iterdir()) == []


def test_the_exported_teacher_gives_its_penultimate_features_from_the_graph(teachers):
    from lrra.external_models import load_exported

    teacher = load_exported(teachers["export"][0].read_bytes())
    original = torch.export.load(teachers["export"][0]).module()
    images = torch.randn(10, 3, SIDE, SIDE)  # not a multiple of the exported batch of 4
    logits, features = teacher(images, return_features=True)
    assert features.shape == (10, 32)
    expected = torch.cat([original(chunk) for chunk in torch.cat([images, images[:2]]).split(4)])[:10]
    assert torch.allclose(logits, expected, atol=1e-5)
    # the features are the head's input: the head applied to them gives the logits
    head_weight = next(v for k, v in original.state_dict().items() if k.startswith("head.weight"))
    head_bias = next(v for k, v in original.state_dict().items() if k.startswith("head.bias"))
    assert torch.allclose(features @ head_weight.T + head_bias, logits, atol=1e-5)


def test_a_whole_pickled_module_is_refused_unless_the_user_opts_in(teachers, tmp_path, capsys):
    path, expected = teachers["pickle"]
    code = main(distill(path, tmp_path / "refused"))
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "--set teacher_format=pickle" in err
    assert not (tmp_path / "refused").exists()
    code = main(distill(path, tmp_path / "run", "--set", "teacher_format=pickle"))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert json.loads(captured.out.strip().splitlines()[-1])["teacher_acc"] == pytest.approx(expected, abs=1e-9)


def bad_inputs(teachers: dict, folder: Path) -> dict[str, tuple[list[str], str]]:
    junk = folder / "junk.pt"
    junk.write_bytes(b"these are not weights")
    return {
        "not a teacher file": ([str(junk)], "not a readable PyTorch weights file"),
        "weights that do not fit": ([str(teachers["export"][0].with_name("small-state.pt")),
                                     "--set", "teacher_arch=torchvision:resnet18"], "do not fit"),
        "output width": ([str(teachers["export"][0]), "--set", "num_classes=5"], "outputs 10 classes"),
        "normalisation length": ([str(teachers["export"][0]), "--set", "input_mean=0.5,0.5"],
                                 "one number per channel"),
        "compiled teacher rejects the size": ([str(teachers["export"][0]), "--set", "image_size=20"],
                                              "rejects input of shape [2, 3, 20, 20]"),
        "student cannot take the size": ([str(teachers["torchvision"][0]), "--set", "teacher_arch=torchvision:resnet18",
                                          "--set", "student_arch=lenet5_half", "--set", "image_size=12"],
                                         "cannot take 12x12 images"),
        "near chance": ([str(teachers["export"][0]), "--set", "input_mean=5,5,5"], "near chance"),
    }


@pytest.mark.parametrize("case", ["not a teacher file", "weights that do not fit", "output width",
                                  "normalisation length", "compiled teacher rejects the size",
                                  "student cannot take the size", "near chance"])
def test_bad_input_fails_with_exit_code_2_naming_the_cause_and_writes_nothing(case, teachers, tmp_path, capsys):
    torch.save(SmallNet().state_dict(), teachers["export"][0].with_name("small-state.pt"))
    (teacher, *extra), message = bad_inputs(teachers, tmp_path)[case]
    command = distill(Path(teacher), tmp_path / "run")
    command += extra  # later --set values win
    code = main(command)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_search_distils_an_exported_teacher_in_its_trials(teachers, tmp_path):
    """The torch.export archive through a real search: its bytes travel to the trial through Ray's
    object store, the trial rebuilds it there, and the trial's student comes out of it."""
    import subprocess

    import pyarrow.parquet as pq

    from tests.services import ROOT, search_command

    path, expected = teachers["export"]
    contract = ["--set", f"image_size={SIDE}", "--set", "channels=3", "--set", f"input_mean={','.join(map(str, MEAN))}",
                "--set", f"input_std={','.join(map(str, STD))}"]
    done = subprocess.run(search_command(tmp_path, path, "--name", "exported", "--num-samples", "1", "--epochs", "2",
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *contract),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"validation accuracy {expected:.4f}" in done.stderr
    [row] = pq.read_table(tmp_path / "exported" / "results.parquet").to_pylist()
    assert row["stop_reason"] == "completed" and row["epochs"] == 2 and math.isfinite(row["best_val_acc"])
    assert list((tmp_path / "exported" / "train" / row["tune_trial_id"]).glob("checkpoint_epoch_*/best_student.pt"))


def test_the_examples_teacher_checks_with_the_flags_it_prints(tmp_path, capsys):
    """examples/own_teacher.py, the docs' plain-PyTorch teacher: the flags it prints are its contract."""
    import shlex
    import subprocess
    import sys

    out = tmp_path / "digits-bn-net.pt2"
    done = subprocess.run([sys.executable, "examples/own_teacher.py", "--arch", "bn-net", "--dataset", "digits",
                           "--epochs", "8", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    flags = shlex.split(done.stdout.strip().splitlines()[-1])
    assert flags[:2] == ["--teacher", str(out)] and "dataset=digits" in flags
    assert main(["check", "--preset", "digits", *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["format"] == "export" and result["image_size"] == 28 and result["teacher_acc"] > 0.5
