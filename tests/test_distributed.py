"""Ray Train layer with real Ray processes: 2 CPU workers over gloo, the digits preset, tiny budgets.

Ray starts once for the module. Worker startup dominates (~20 s per fit on a 2-core machine), so
one fit (``two_rank_probe``) serves the gradient, identical-model and metric checks, and one run
through ``run_distributed`` (``recovered_run``) serves failure recovery and, started again, the
restart of a finished run.
"""

import json
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from torch import nn

from lrra import collectives, distributed, fault_injection
from lrra.cli import main
from lrra.config import ConfigError, preset
from lrra.meta import student_objective, student_update
from lrra.metric_names import DIVERGED_KEY
from lrra.models import build_classifier
from lrra.preflight import DistributedSetupError
from lrra.runner import RunDiverged
from lrra.teacher import load_teacher

META_LR, WEIGHT_DECAY = 0.5, 5e-4
# Digits, 3 epochs of 2 iterations (1 generator + 2 student steps each), with a memory that takes
# a push after every epoch, so epochs 1 and 2 run the second-order LRRA step on a replayed batch.
DIGITS = dict(epochs=3, iters_per_epoch=2, kd_steps=2, memory_capacity=4)


@pytest.fixture(scope="module")
def ray_cluster():
    # 4 logical CPUs on a 2-core machine: two 1-CPU workers fit, with room to spare.
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    # Workers cannot import this file by name; ship its functions by value instead.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def convnet_teacher(digits_teacher):
    """(state_dict, meta, path) of the session's trained digits convnet. These tests check mechanics,
    not accuracy, but a run refuses a teacher that scores near chance before it starts."""
    path, meta = digits_teacher
    return torch.load(path, weights_only=True)["state_dict"], meta, path


# ----------------------------------------------------------------------------------------
# One 2-worker fit that records, per rank: synced gradients of a tiny MLP, and the state and
# reduced metrics of a real worker Distiller.


def tiny_mlp() -> nn.Module:
    """No BatchNorm; tanh so that the second-order term of the meta-gradient is not zero."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def rank_batches(rank: int) -> tuple[torch.Tensor, ...]:
    """(x_new, y_new, x_mem, y_mem) of one rank: equal sizes on every rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(8, 12, generator=g), torch.randn(8, 5, generator=g),
            torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g))


def probe_ranks(config: dict) -> None:
    """Ray Train function: each rank saves what the tests compare to rank_<r>.pt under config["out"]."""
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])

    grads = {}
    for order in (0, 1, 2):
        student = tiny_mlp()
        student_update(student, torch.optim.SGD(student.parameters(), lr=0.1), *rank_batches(rank),
                       meta_lr=META_LR, weight_decay=WEIGHT_DECAY, retention_order=order,
                       sync_grads=collectives.average_gradients, mean_over_ranks=collectives.mean_over_ranks)
        grads[order] = [p.grad for p in student.parameters()]

    distiller = distributed.worker_distiller(config)
    metrics = [distiller.train_epoch() for _ in range(distiller.cfg.epochs)]  # reduced across ranks inside
    torch.save({"grads": grads, "student": distiller.student.state_dict(),
                "generator": distiller.generator.state_dict(), "memory": distiller.memory.state_dict()["batches"],
                "metrics": metrics}, out / f"rank_{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_probe(ray_cluster, convnet_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    teacher_state, teacher_meta, _ = convnet_teacher
    config = distributed.train_loop_config(preset("digits", **DIGITS), teacher_state, teacher_meta)
    TorchTrainer(probe_ranks, train_loop_config={**config, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="probe", storage_path=str(out / "storage"))).fit()
    return [torch.load(out / f"rank_{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.parametrize("order", [0, 1, 2])
def test_two_workers_take_the_step_of_one_process_on_the_union_of_their_batches(two_rank_probe, order):
    rank0, rank1 = (probe["grads"][order] for probe in two_rank_probe)
    for g0, g1 in zip(rank0, rank1, strict=True):
        assert torch.equal(g0, g1)  # every rank steps with the same gradient

    # One process, one LRRA step on both ranks' fresh and replayed batches together. With
    # retention the fast weights depend on the whole fresh batch, so this holds only because the
    # acquisition gradient is averaged across ranks (differentiably) before theta' is formed.
    student = tiny_mlp()
    params = list(student.parameters())
    x_new, y_new, x_mem, y_mem = (torch.cat(parts) for parts in zip(rank_batches(0), rank_batches(1), strict=True))
    union = student_objective(student, x_new, y_new, x_mem, y_mem, meta_lr=META_LR,
                              weight_decay=WEIGHT_DECAY, retention_order=order)[0]
    for synced, want in zip(rank0, torch.autograd.grad(union, params), strict=True):
        torch.testing.assert_close(synced, want, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.alone
def test_ranks_hold_bit_identical_models_after_training(two_rank_probe):
    rank0, rank1 = two_rank_probe
    # Different latent streams (seed + rank): the memory shards differ...
    assert len(rank0["memory"]) == len(rank1["memory"]) == DIGITS["epochs"]
    assert not torch.equal(rank0["memory"][0], rank1["memory"][0])
    # ...yet averaged gradients and BatchNorm statistics keep every parameter and buffer equal.
    for part in ("student", "generator"):
        for name, tensor in rank0[part].items():
            assert torch.equal(tensor, rank1[part][name]), f"{part}.{name}"
    torch.manual_seed(0)  # the Distiller's initial student
    initial = build_classifier("convnet_half", 10, 1).state_dict()
    assert not torch.equal(rank0["student"]["fc.weight"], initial["fc.weight"])  # it did train


@pytest.mark.slow
@pytest.mark.alone
def test_metrics_are_reduced_across_ranks(two_rank_probe):
    rank0, rank1 = (probe["metrics"] for probe in two_rank_probe)
    for m0, m1 in zip(rank0, rank1, strict=True):
        assert m0["perf/workers"] == 2
        assert {k: v for k, v in m0.items() if k.startswith("loss/")} == \
               {k: v for k, v in m1.items() if k.startswith("loss/")}
        assert "val/student_acc" in m0 and "val/student_acc" not in m1  # rank 0 evaluates


# ----------------------------------------------------------------------------------------
# Failure recovery through the public entry point.


class ReportLog(UserCallback):
    """Appends what the controller sees to JSON lines (callbacks run in the controller process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def after_report(self, run_context, metrics, checkpoint):
        self._write({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None})

    def after_exception(self, run_context, worker_exceptions):
        self._write({"failed_ranks": sorted(worker_exceptions),
                     "errors": [type(e).__name__ + str(e) for e in worker_exceptions.values()]})


@pytest.fixture(scope="module")
def recovered_run(ray_cluster, convnet_teacher, tmp_path_factory):
    """A 2-worker run whose rank fails at epoch 1 and that recovers from its checkpoint: (config,
    storage, summary, report log). The failure test reads it; the restart test starts it again."""
    _, _, teacher_path = convnet_teacher
    folder = tmp_path_factory.mktemp("fault")
    cfg = preset("digits", **DIGITS, teacher_path=str(teacher_path), data_dir=str(folder))
    storage, log = str(folder / "storage"), folder / "reports.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(fault_injection.ENV, "fault_at_epoch=1")
        summary = distributed.run_distributed(cfg, workers=2, storage_path=storage, name="fault",
                                              max_failures=1, callbacks=[ReportLog(log)])
    return cfg, storage, summary, log


@pytest.mark.slow
@pytest.mark.alone
def test_worker_failure_resumes_from_the_last_checkpoint(two_rank_probe, recovered_run):
    _, _, summary, log = recovered_run
    records = [json.loads(line) for line in log.read_text().splitlines()]
    failures = [r for r in records if "failed_ranks" in r]
    reports = [r for r in records if "metrics" in r]
    assert len(failures) == 1 and "InjectedFault" in failures[0]["errors"][0]
    assert [r["metrics"][0]["epoch"] for r in reports] == [0, 1, 2]  # none repeated, none skipped
    assert all(len(r["metrics"]) == 2 and r["checkpoint"] for r in reports)

    # The resumed run continues exactly where the uninterrupted probe run went.
    probe_metrics = two_rank_probe[0]["metrics"]
    for reported, straight in zip(reports, probe_metrics, strict=True):
        for key in straight:
            if key.startswith(("loss/", "val/", "memory/")):
                assert reported["metrics"][0][key] == straight[key], key

    assert summary["epochs"] == 3 and summary["workers"] == 2
    assert summary["best_val_acc"] == max(m["val/student_acc"] for m in probe_metrics)
    checkpoint = Path(summary["checkpoint"])
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "best_student.pt", "rank_0.pt", "rank_1.pt", "state.pt"]


# ----------------------------------------------------------------------------------------
# Bad input: clear errors before any work.


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.parametrize("workers, use_gpu", [(5, False), (1, True)])
def test_more_workers_than_the_cluster_can_place_fail_fast(ray_cluster, tmp_path, workers, use_gpu):
    storage = tmp_path / "storage"
    expected = rf"--workers {workers} asks for .* the Ray cluster has"
    with pytest.raises(DistributedSetupError, match=expected):
        distributed.run_distributed(preset("digits"), workers=workers, use_gpu=use_gpu, storage_path=str(storage))
    assert not storage.exists()


def test_unwritable_storage_fails_before_training(tmp_path, capsys):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    code = main(["distill", "--preset", "digits", "--workers", "2", "--storage", str(a_file / "runs")])
    assert code == 2
    assert f"--storage {a_file / 'runs'}: {a_file} is a file" in capsys.readouterr().err


def test_unreachable_address_fails_fast(tmp_path, capsys):
    argv = ["--workers", "1", "--address", "127.0.0.1:1", "--storage", str(tmp_path)]
    assert main(["distill", "--preset", "digits", *argv]) == 2
    assert "--address 127.0.0.1:1: nothing answers there" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--workers", "-1"], "--workers -1: Ray Train needs at least 1 worker"),
    (["--gpu", "--max-failures", "1"], "--gpu, --max-failures only apply with --workers N >= 1"),
    (["--workers", "2", "--resume", "x.pt"], "--out and --resume are for --workers 0"),
])
def test_cli_rejects_inconsistent_distributed_flags(argv, message, capsys, tmp_path):
    if "--resume" in argv:
        (tmp_path / "x.pt").write_text("")
        argv = [str(tmp_path / "x.pt") if a == "x.pt" else a for a in argv]
    assert main(["distill", "--preset", "digits", *argv]) == 2
    assert message in capsys.readouterr().err


def test_fault_switch_needs_a_checkpoint_before_it(monkeypatch):
    monkeypatch.setenv(fault_injection.ENV, "fault_at_epoch=0")
    with pytest.raises(ConfigError, match="LRRA_TEST_FAULTS: fault_at_epoch=0 needs a checkpoint before it"):
        distributed.build_trainer(preset("digits"), {}, {}, workers=2,
                                  storage_path="/tmp/unused", name="unused")


# ----------------------------------------------------------------------------------------
# Late failures and restarts of finished runs.


@pytest.mark.slow
@pytest.mark.alone
def test_a_diverging_ray_train_run_keeps_its_best_student(ray_cluster, convnet_teacher, tmp_path, monkeypatch):
    _, _, teacher_path = convnet_teacher
    monkeypatch.setenv(fault_injection.ENV, "nan_at_epoch=2")
    cfg = preset("digits", **DIGITS, teacher_path=str(teacher_path), data_dir=str(tmp_path))
    log = tmp_path / "reports.jsonl"
    with pytest.raises(RunDiverged, match="non-finite loss at epoch 2") as caught:
        distributed.run_distributed(cfg, workers=2, storage_path=str(tmp_path / "storage"), name="nan",
                                    callbacks=[ReportLog(log)])
    reports = [json.loads(line)["metrics"] for line in log.read_text().splitlines()]
    # Epochs 0 and 1, then the last good epoch once more from both ranks, marked diverged.
    assert [r[0]["epoch"] for r in reports] == [0, 1, 1]
    assert [r[DIVERGED_KEY] for r in reports[-1]] == [1, 1]
    summary = caught.value.result
    best = max(r[0]["val/student_acc"] for r in reports[:2])
    assert summary["best_val_acc"] == best and summary["epochs"] == 2
    _, meta = load_teacher(summary["best_student"], preset("digits", teacher_arch="convnet_half"))
    assert meta["val_accuracy"] == best and meta["test_accuracy"] == summary["test_acc"] is not None


@pytest.mark.slow
@pytest.mark.alone
def test_a_finished_run_started_again_reports_its_end_without_training(recovered_run, tmp_path):
    cfg, storage, first, _ = recovered_run
    log = tmp_path / "again.jsonl"
    again = distributed.run_distributed(cfg, workers=2, storage_path=storage, name="fault",
                                        callbacks=[ReportLog(log)])
    reports = [json.loads(line)["metrics"] for line in log.read_text().splitlines()]
    assert len(reports) == 1 and reports[0][0]["epoch"] == DIGITS["epochs"] - 1
    assert reports[0][0]["val/best_student_acc"] == first["best_val_acc"]
    assert reports[0][0]["test/best_student_acc"] == first["test_acc"] is not None
    keys = ("best_val_acc", "test_acc", "epochs")
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
