"""Real runs of the core loop on scikit-learn's digits: learning, resume, failure modes."""

import json
import math

import mlflow
import pytest
import torch

from lrra import fault_injection
from lrra.cli import EXIT_DIVERGED, main
from lrra.config import preset
from lrra.data import load_split
from lrra.distiller_state import load_checkpoint, save_checkpoint
from lrra.fault_injection import NO_FAULTS, Faults
from lrra.metric_names import RARE_CLASSES_METRIC
from lrra.runner import default_run_name, format_progress
from lrra.schedule import cosine_factor
from lrra.splits import evaluation_splits
from lrra.teacher import load_teacher
from lrra.train import Distiller, NonFiniteLossError, rare_classes


def digits_run(teacher_path, faults=NO_FAULTS, **overrides):
    cfg = preset("digits", teacher_path=str(teacher_path), **overrides)
    teacher, meta = load_teacher(teacher_path, cfg)
    return Distiller(cfg, teacher, evaluation_splits(cfg, meta), device=torch.device("cpu"), faults=faults)


def test_teacher_is_accurate(digits_teacher):
    _, meta = digits_teacher
    assert meta["test_accuracy"] >= 0.9


def test_tiny_run_lifts_the_student_far_above_chance(digits_teacher):
    path, _ = digits_teacher
    distiller = digits_run(path, epochs=5)
    untrained = distiller._validate()["val/student_acc"]
    distiller.accuracies.clear()
    distiller.best_accuracy = -1
    distiller.run()
    # Chance is 0.1; 5 short epochs (a fifth of the preset's) are a smoke budget, not a quality target.
    assert distiller.best_accuracy >= 0.45 > untrained + 0.25
    assert len(distiller.accuracies) == distiller.cfg.epochs


def test_each_epoch_counts_the_classes_its_generator_hardly_draws(digits_teacher):
    path, _ = digits_teacher
    distiller = digits_run(path, epochs=2, iters_per_epoch=4, gen_steps=2)
    metrics = distiller.train_epoch()
    drawn = distiller._drawn_classes.tolist()
    assert sum(drawn) == 4 * 2 * distiller.cfg.batch_size  # every adversarial generator step's images, once
    assert distiller.rare_classes == rare_classes(drawn)
    assert metrics[RARE_CLASSES_METRIC] == len(distiller.rare_classes)
    assert rare_classes([10, 0, 10, 2]) == [1]  # an even share is 5.5: under 1.375 is rare
    assert rare_classes([5, 5, 5, 5]) == []
    # the progress line names the count only when there is one
    assert "rare classes 3" in format_progress({**metrics, RARE_CLASSES_METRIC: 3.0}, 2)
    assert "rare" not in format_progress({**metrics, RARE_CLASSES_METRIC: 0.0}, 2)
    fixed = digits_run(path, epochs=1, iters_per_epoch=2, gen_steps=0).train_epoch()
    assert RARE_CLASSES_METRIC not in fixed  # a fixed generator is not counted


def test_resume_is_bit_for_bit(digits_teacher, tmp_path):
    path, _ = digits_teacher
    with_memory = dict(epochs=4, memory_capacity=4)  # the memory's contents must resume too
    straight = digits_run(path, **with_memory)
    straight_metrics = [straight.train_epoch() for _ in range(4)]

    first = digits_run(path, **with_memory)
    resumed_metrics = [first.train_epoch() for _ in range(2)]
    save_checkpoint(first.state_dict(), tmp_path / "checkpoint.pt")
    second = digits_run(path, **with_memory)
    second.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert len(second.memory) == len(first.memory) > 0
    resumed_metrics += [second.train_epoch() for _ in range(2)]

    for name, tensor in straight.state_dict()["student"].items():
        assert torch.equal(tensor, second.state_dict()["student"][name]), name
    for name, tensor in straight.state_dict()["generator"].items():
        assert torch.equal(tensor, second.state_dict()["generator"][name]), name
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    assert [strip(m) for m in straight_metrics] == [strip(m) for m in resumed_metrics]


def test_non_finite_loss_stops_the_epoch_on_every_path(digits_teacher):
    path, _ = digits_teacher
    distiller = digits_run(path, faults=Faults(nan_at_epoch=1))
    distiller.train_epoch()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1"):
        distiller.train_epoch()
    assert distiller.epoch == 1 and len(distiller.accuracies) == 1  # the bad epoch counts for nothing


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_that_diverges_late_keeps_its_best_student(digits_teacher, tmp_path, capsys, monkeypatch):
    path, _ = digits_teacher
    out = tmp_path / "run"
    monkeypatch.setenv(fault_injection.ENV, "nan_at_epoch=2")
    code = main(["distill", "--preset", "digits", "--teacher", str(path), "--epochs", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_DIVERGED
    # One clear line, no traceback; the JSON line still says what the run achieved.
    assert captured.err.count("error: ") == 1 and "Traceback" not in captured.err
    assert "non-finite loss at epoch 2" in captured.err and "Kept the best student so far" in captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    accuracies = [m["val/student_acc"] for m in read_metrics(out)]
    assert len(accuracies) == 2 and result["best_val_acc"] == max(accuracies) and "diverged" in result

    # The real run wrote its checkpoints: the last good one is intact, and the best student is kept.
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    student, meta = load_teacher(out / "best_student.pt", preset("digits", teacher_arch="convnet_half"))
    assert meta["val_accuracy"] == max(accuracies) and meta["best_epoch"] == accuracies.index(max(accuracies))
    assert meta["test_accuracy"] == result["test_acc"] is not None  # scored once, for the kept student

    # MLflow: the run FAILED with the reason, and its best student is a logged model.
    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.info.status == "FAILED" and "non-finite loss" in run.data.tags["lrra.failure"]
    logged = mlflow.pytorch.load_model(result["model_uri"])
    images = load_split("digits", "data", False, 8, 1).tensors[0][:16]
    torch.testing.assert_close(logged(images), student(images), rtol=1e-5, atol=1e-5)


def test_cli_distill_prints_metrics_and_writes_a_loadable_student(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    out = tmp_path / "run"
    code = main(["distill", "--preset", "digits", "--teacher", str(path), "--epochs", "2", "--out", str(out),
                 "--data-dir", str(tmp_path / "data")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    accuracies = [m["val/student_acc"] for m in read_metrics(out)]
    assert result["epochs"] == 2 and len(accuracies) == 2
    assert result["best_val_acc"] == max(accuracies) and result["final_val_acc"] == accuracies[-1]
    student_cfg = preset("digits", teacher_arch="convnet_half")
    student, meta = load_teacher(out / "best_student.pt", student_cfg)
    assert meta["val_accuracy"] == result["best_val_acc"] and meta["test_accuracy"] == result["test_acc"]
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


def test_cli_resume_extends_epochs_on_a_rebuilt_cosine(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    out, base_lr = tmp_path / "run", preset("digits").student_lr
    common = ["distill", "--preset", "digits", "--teacher", str(path), "--out", str(out)]
    assert main([*common, "--epochs", "2"]) == 0
    assert main([*common, "--epochs", "4", "--resume", str(out / "checkpoint.pt")]) == 0
    assert "resumed from" in capsys.readouterr().err
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    # lr/student is the rate each epoch trained with: cosine over 2 epochs, then over 4 from epoch 2.
    expected = [base_lr * cosine_factor(0, 2), base_lr * cosine_factor(1, 2),
                base_lr * cosine_factor(2, 4), base_lr * cosine_factor(3, 4)]
    assert [m["lr/student"] for m in metrics] == pytest.approx(expected, rel=1e-12)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 4


@pytest.mark.parametrize("change, message", [
    (["--set", "student_lr=0.2"], "student_lr (checkpoint 0.1, now 0.2)"),
    (["--set", "memory_capacity=2", "--set", "w_adv=0.5"], "memory_capacity (checkpoint 0, now 2), w_adv"),
    (["--epochs", "1"], "'epochs' = 1 is below the 2 epochs"),
])
def test_resume_refuses_a_changed_configuration(digits_teacher, tmp_path, capsys, change, message):
    path, _ = digits_teacher
    out = tmp_path / "run"
    common = ["distill", "--preset", "digits", "--teacher", str(path), "--out", str(out)]
    assert main([*common, "--epochs", "2"]) == 0
    before = (out / "metrics.jsonl").read_text(), (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume", str(out / "checkpoint.pt"), *change]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and message in err and "Traceback" not in err
    assert ((out / "metrics.jsonl").read_text(), (out / "checkpoint.pt").read_bytes()) == before


def test_unreadable_or_foreign_checkpoint_is_one_line_and_exit_2(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for checkpoint, message in ((garbage, "is not a readable LRRA checkpoint"),
                                (path, "is not an LRRA distill checkpoint (missing")):
        code = main(["distill", "--preset", "digits", "--teacher", str(path), "--resume", str(checkpoint),
                     "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


def test_a_fixed_generator_is_a_supported_ablation(digits_teacher, tmp_path, capsys):
    path, _ = digits_teacher
    distiller = digits_run(path, gen_steps=0, epochs=2)
    initial = {k: v.clone() for k, v in distiller.generator.named_parameters()}
    metrics = distiller.run()
    assert not any(key.startswith("loss/gen") for key in metrics)
    for name, value in distiller.generator.named_parameters():
        assert torch.equal(value, initial[name]), name
    out = tmp_path / "run"
    assert main(["distill", "--preset", "digits", "--teacher", str(path), "--epochs", "2", "--out", str(out),
                 "--set", "gen_steps=0"]) == 0
    assert "epoch 2/2" in capsys.readouterr().err and "L_G" not in (out / "metrics.jsonl").read_text()


def test_default_names_are_unique_and_say_what_was_distilled():
    names = {default_run_name(preset("digits")) for _ in range(20)}  # all within one second
    assert len(names) == 20 and all(name.startswith("digits-") for name in names)
    assert default_run_name(preset("mnist", dataset="FashionMNIST")).startswith("fashionmnist-")


@pytest.mark.parametrize("options", [dict(bf16=True), dict(channels_last=False)])
def test_layout_and_precision_options_run_on_the_cpu(digits_teacher, options):
    path, _ = digits_teacher
    plain = digits_run(path, epochs=1, iters_per_epoch=4).train_epoch()
    distiller = digits_run(path, epochs=1, iters_per_epoch=4, **options)
    metrics = distiller.train_epoch()
    losses = {k: v for k, v in metrics.items() if k.startswith("loss/")}
    assert all(math.isfinite(v) for v in losses.values()) and metrics["val/student_acc"] > 0.1
    conv = distiller.student.body[3].weight  # 32 -> 64 channels: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) == options.get("channels_last", True)
    if options.get("bf16"):  # autocast really ran: the losses moved off the float32 ones
        assert losses != {k: v for k, v in plain.items() if k.startswith("loss/")}


def test_retention_switches_on_exactly_at_the_warmup_epoch(digits_teacher):
    """Until epoch 2 the run with warm-up is the replay-only run, bit for bit; from epoch 2 it retains."""
    path, _ = digits_teacher
    short = dict(epochs=3, iters_per_epoch=4, memory_capacity=4)  # the preset has no memory
    warm = digits_run(path, retention_order=2, retention_warmup_epochs=2, **short)
    replay = digits_run(path, retention_order=0, **short)
    for epoch in range(3):
        warm_metrics, replay_metrics = warm.train_epoch(), replay.train_epoch()
        same = all(torch.equal(a, b) for a, b in zip(warm.student.state_dict().values(),
                                                     replay.student.state_dict().values(), strict=True))
        assert same == (epoch < 2), epoch
        assert ("loss/student_retention" in warm_metrics) == (epoch == 2), epoch
        assert "loss/student_retention" not in replay_metrics
    assert warm_metrics["memory/size"] == 3  # the memory was replayed from epoch 1 on, retention off


def test_replay_batch_size_sets_the_replayed_images_per_step(digits_teacher):
    path, _ = digits_teacher
    distiller = digits_run(path, replay_batch_size=24, memory_push_size=16, memory_capacity=4)
    distiller.memory.push(torch.zeros(16, 1, 8, 8))
    assert distiller._replay_batch().shape == (24, 1, 8, 8)
    whole = digits_run(path, replay_batches=3, memory_push_size=16, memory_capacity=4)
    whole.memory.push(torch.zeros(16, 1, 8, 8))
    assert whole._replay_batch().shape == (48, 1, 8, 8)


def test_random_shift_moves_each_image_by_its_own_offset_within_the_bound():
    from lrra.train import random_shift

    images = torch.zeros(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T
    assert shifted.shape == images.shape and len(rows) == 64  # the pixel stays inside, once per image
    assert (rows - 4).abs().max() <= 2 and (cols - 4).abs().max() <= 2
    assert len({(r.item(), c.item()) for r, c in zip(rows, cols, strict=True)}) > 10  # offsets differ


def test_the_student_average_is_what_is_evaluated_and_kept_and_it_resumes(digits_teacher):
    path, _ = digits_teacher
    straight = digits_run(path, student_ema=0.9, epochs=2)
    straight.run()
    kept = straight.evaluated_student
    assert kept is straight.student_average.module
    # the average differs from the last weights, and the best epoch's copy of it is what is kept
    last = dict(straight.student.named_parameters())
    assert any(not torch.equal(p, last[name]) for name, p in kept.named_parameters())
    if straight.best_epoch == straight.epoch - 1:
        assert all(torch.equal(v.cpu(), straight.best_student[k]) for k, v in kept.state_dict().items())
    first = digits_run(path, student_ema=0.9, epochs=2)
    first.train_epoch()
    second = digits_run(path, student_ema=0.9, epochs=2)
    second.load_state_dict(first.state_dict())
    second.train_epoch()
    for (name, a), b in zip(straight.student_average.state_dict().items(),
                            second.student_average.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
