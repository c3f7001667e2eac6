"""Real runs of the core loop on scikit-learn's digits: learning, resume, failure modes."""

import json

import pytest
import torch

from lrra.cli import main
from lrra.config import preset
from lrra.data import load_split
from lrra.teacher import load_teacher
from lrra.train import Distiller, NonFiniteLossError, load_checkpoint, save_checkpoint


def digits_run(teacher_path, **overrides):
    cfg = preset("digits", teacher_path=str(teacher_path), **overrides)
    teacher, _ = load_teacher(teacher_path, cfg)
    test_set = load_split(cfg.dataset, cfg.data_dir, False, cfg.image_size, cfg.channels)
    return Distiller(cfg, teacher, test_set, device=torch.device("cpu"))


def test_teacher_is_accurate(digits_teacher):
    _, meta = digits_teacher
    assert meta["test_accuracy"] >= 0.9


def test_tiny_run_lifts_the_student_far_above_chance(digits_teacher):
    path, _ = digits_teacher
    distiller = digits_run(path)
    untrained = distiller._evaluate()["eval/student_acc"]
    distiller.accuracies.clear()
    distiller.best_accuracy = -1
    distiller.run()
    # Chance is 0.1; the preset's 5 short epochs are a smoke budget, not a quality target.
    assert distiller.best_accuracy >= 0.45 > untrained + 0.25
    assert len(distiller.accuracies) == distiller.cfg.epochs


def test_resume_is_bit_for_bit(digits_teacher, tmp_path):
    path, _ = digits_teacher
    straight = digits_run(path, epochs=4)
    straight_metrics = [straight.train_epoch() for _ in range(4)]

    first = digits_run(path, epochs=4)
    resumed_metrics = [first.train_epoch() for _ in range(2)]
    save_checkpoint(first.state_dict(), tmp_path / "checkpoint.pt")
    second = digits_run(path, epochs=4)
    second.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert len(second.memory) == len(first.memory) > 0
    resumed_metrics += [second.train_epoch() for _ in range(2)]

    for name, tensor in straight.state_dict()["student"].items():
        assert torch.equal(tensor, second.state_dict()["student"][name]), name
    for name, tensor in straight.state_dict()["generator"].items():
        assert torch.equal(tensor, second.state_dict()["generator"][name]), name
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    assert [strip(m) for m in straight_metrics] == [strip(m) for m in resumed_metrics]


def test_non_finite_loss_stops_with_the_checkpoint_intact(digits_teacher, tmp_path):
    path, _ = digits_teacher
    distiller = digits_run(path)
    distiller.train_epoch()
    save_checkpoint(distiller.state_dict(), tmp_path / "checkpoint.pt")
    with torch.no_grad():
        next(distiller.teacher.parameters()).fill_(float("nan"))  # a teacher gone bad mid-run
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        distiller.train_epoch()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_cli_distill_prints_metrics_and_writes_a_loadable_student(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    out = tmp_path / "run"
    code = main(["distill", "--preset", "digits", "--teacher", str(path), "--epochs", "2", "--out", str(out),
                 "--data-dir", str(tmp_path / "data")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["epochs"] == 2 and 0 <= result["best_student_acc"] <= 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    student_cfg = preset("digits", teacher_arch="convnet_half")
    student, meta = load_teacher(out / "best_student.pt", student_cfg)
    assert meta["test_accuracy"] == result["best_student_acc"]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_wrong_class_teacher_is_refused_before_anything_is_written(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    out = tmp_path / "run"
    code = main(["distill", "--preset", "digits", "--teacher", str(path), "--set", "num_classes=100",
                 "--out", str(out)])
    assert code == 2
    assert "num_classes=10" in capsys.readouterr().err and not out.exists()


def test_missing_teacher_file_and_checkpoint_are_clear_errors(tmp_path, capsys):
    assert main(["distill", "--preset", "digits", "--teacher", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["distill", "--preset", "digits", "--resume", str(tmp_path / "none.pt")]) == 2
    assert "--resume" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["distill", "--preset", "digits", "--teacher", str(garbage), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable PyTorch weights file" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bad_config_value_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["distill", "--preset", "digits", "--set", "meta_lr=-1", "--out", str(tmp_path / "o")]) == 2
    assert "'meta_lr' = -1.0" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_missing_dataset_is_a_clear_error_before_anything_is_written(tmp_path, offline, capsys):
    out, data_dir = tmp_path / "run", tmp_path / "data"
    assert main(["distill", "--preset", "cifar10", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CIFAR10" in err and "torchvision download" in err
    assert not out.exists() and not [p for p in data_dir.rglob("*") if p.is_file()]
