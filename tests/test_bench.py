"""The benchmark suite runs end to end, and its authors'-style baseline computes our update."""

import copy
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from lrra.meta import student_update
from lrra.models import build_classifier

ROOT = Path(__file__).resolve().parent.parent
ALPHA, WD = 0.7, 5e-4


def applied_gradient(student, update) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the gradient an update applied, read off a plain SGD(lr=1) step; the buffers after it)."""
    before = [p.detach().clone() for p in student.parameters()]
    update(student, torch.optim.SGD(student.parameters(), lr=1.0))
    return ([b - p.detach() for b, p in zip(before, student.parameters(), strict=True)],
            [b.clone() for b in student.buffers()])


def test_authors_baseline_equals_our_second_order_update():
    higher_baseline = pytest.importorskip("bench.authors_update",
                                          reason="needs the bench extra: pip install -e .[bench]")
    torch.manual_seed(0)
    # A small conv net with BatchNorm, in float64 so that 1e-5 measures the maths, not rounding.
    student = build_classifier("convnet_half", 5, 1).double().train()
    g = torch.Generator().manual_seed(1)
    x_new, x_mem = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 1, 8, 8, generator=g,
                                                                                          dtype=torch.float64)
    y_new, y_mem = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                                                                                      dtype=torch.float64)

    def ours(model, optimizer):
        student_update(model, optimizer, x_new, y_new, x_mem, y_mem, meta_lr=ALPHA, weight_decay=WD,
                       retention_order=2)

    def authors(model, optimizer):
        higher_baseline.AuthorsUpdate(model, optimizer, meta_lr=ALPHA, weight_decay=WD)(x_new, y_new, x_mem, y_mem)

    def replay_only(model, optimizer):
        student_update(model, optimizer, x_new, y_new, x_mem, y_mem, meta_lr=ALPHA, weight_decay=WD,
                       retention_order=0)

    want, want_buffers = applied_gradient(copy.deepcopy(student), ours)
    got, got_buffers = applied_gradient(copy.deepcopy(student), authors)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The fast passes moved no BatchNorm statistics in either: only the plain KD forward did.
    for a, b in zip(got_buffers, want_buffers, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # Not trivially equal: the retention term reaches the student (a detached baseline would be replay only).
    replay, _ = applied_gradient(copy.deepcopy(student), replay_only)
    assert max((a - b).abs().max().item() for a, b in zip(got, replay, strict=True)) > 1e-4


def test_quick_suite_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["torch_threads"] == 1 and report["quick"] is True
    assert report["versions"]["torch"] == metadata.version("torch")
    assert report["memory_method"].startswith("peak RSS growth")
    steps = ["plain_kd", "order0", "order1", "order2", "generator_step", "iteration"]
    try:
        import higher  # noqa: F401
        steps.append("authors_order2")
    except ImportError:
        pass
    for name, teacher, student in (("mnist", "lenet5", "lenet5_half"), ("resnet", "resnet34", "resnet18")):
        pair = report["pairs"][name]
        assert (pair["teacher"], pair["student"]) == (teacher, student)
        assert set(pair["ms"]) == set(steps) and all(ms > 0 for ms in pair["ms"].values())
        assert pair["ratio_to_plain_kd"]["plain_kd"] == 1.0
        assert set(pair["ratio_to_plain_kd"]) == {s for s in steps if s not in ("generator_step", "iteration")}
        assert pair["images_per_s"] == pytest.approx(pair["kd_steps"] * pair["batch"] / pair["ms"]["iteration"] * 1e3)
        assert set(pair["peak_mib"]) == set(steps)
        assert all(mib is not None and mib >= 0 for mib in pair["peak_mib"].values())
        if "authors_order2" in steps:
            assert pair["order2_over_authors"] == pytest.approx(pair["ms"]["order2"] / pair["ms"]["authors_order2"])
    # The table names the device and threads too.
    assert "torch threads 1" in done.stdout and "x plain KD" in done.stdout


def test_the_gpu_check_runs_in_skip_mode_without_cuda(tmp_path):
    """`python -m bench.gpu` on a machine without CUDA: every part says skipped, the JSON is written, exit 0."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["verdict"] == "skipped" and report["tests"]["status"] == "skipped"
    names = {t["test"] for t in report["tests"]["tests"]}
    assert {"test_gpu::test_meta_gradient_on_cuda_matches_the_float64_cpu_reference[2]",
            "test_gpu::test_a_one_worker_ray_train_run_with_nccl"} <= names
    assert all(t["status"] == "skipped" for t in report["tests"]["tests"])
    assert {b["status"] for b in report["bench"].values()} == {"skipped"}
    assert "GPU check on no CUDA device (skip mode): skipped" in done.stdout


def test_the_real_image_ceiling_trains_the_runs_student_on_real_images(tmp_path, digits_teacher, capsys):
    from bench.real_image_ceiling import main as ceiling

    out = tmp_path / "ceiling.json"
    ceiling(["--preset", "digits", "--teacher", str(digits_teacher[0]), "--data-dir", str(tmp_path), "--steps", "100",
             "--out", str(out)])
    figures, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert figures["steps"] == 100
    assert figures["teacher"]["test_acc"] == pytest.approx(digits_teacher[1]["test_accuracy"])
    for kind in ("l1", "kl", "labels"):
        assert 0 < figures[kind]["step"] <= 100 and 0.5 < figures[kind]["test_acc"] <= 1, figures[kind]
        assert f"\n{kind} " in printed
    for bad_flags, named in ((["--losses", "l1,mse"], "mse"), (["--steps", "0"], "--steps"),
                             (["--preset", "digits", "--set", "student_lr=-1"], "student_lr")):
        with pytest.raises(SystemExit) as refused:
            ceiling(bad_flags)
        assert refused.value.code == 2 and named in capsys.readouterr().err


def test_the_synthetic_image_check_counts_what_a_runs_generator_draws(tmp_path, digits_teacher, capsys):
    from bench.synthetic_images import main as check_images
    from lrra.cli import main as lrra
    from lrra.train import rare_classes

    run = tmp_path / "run"
    assert lrra(["distill", "--preset", "digits", "--teacher", str(digits_teacher[0]), "--data-dir", str(tmp_path),
                 "--epochs", "1", "--set", "iters_per_epoch=5", "--out", str(run), "--tracking-uri", "none"]) == 0
    capsys.readouterr()
    out = tmp_path / "images.json"
    check_images([str(run / "checkpoint.pt"), "--images", "100", "--out", str(out)])
    figures, printed = json.loads(out.read_text()), capsys.readouterr().out
    assert sum(figures["synthetic"]["classes"]) == 100 and len(figures["synthetic"]["classes"]) == 10
    assert sum(figures["real"]["classes"]) == 100  # digits' validation split holds 144
    # the teacher (97 % on digits) puts real validation images in every class
    assert min(figures["real"]["classes"]) > 0 and figures["real"]["teacher_confidence"] > 0.5
    for row in (figures["synthetic"], figures["real"]):
        assert row["per_image_std"] > 0 and row["total_variation"] > 0
    assert figures["rare_classes"] == rare_classes(figures["synthetic"]["classes"])
    assert "\nsynthetic " in printed and "\nreal " in printed

    for bad_args, named in (([str(out)], "checkpoint"), ([str(run / "checkpoint.pt"), "--images", "0"], "--images")):
        with pytest.raises(SystemExit) as refused:
            check_images(bad_args)
        assert refused.value.code == 2 and named in capsys.readouterr().err
