"""MLflow tracking of searches: trial and parent runs, run status, pictures and tables on small
synthetic Optuna studies, tracking URIs; the slow tier runs `tune/search.py` smoke searches
against a real `mlflow server`, as a user does, and reads what they logged back through
MlflowClient."""

import contextlib
import time
from pathlib import Path

import mlflow.pytorch
import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lrra import tracking
from lrra.config import preset
from lrra.library_hooks import ray_detected_cpus
from lrra.models import build_generator
from lrra.teacher import load_teacher
from tests.search_records import epochs_logged, search_runs
from tests.services import free_port
from tests.tracking_helpers import (
    DISTILL,
    check_distill_run,
    check_eval_reproduces,
    distill_into,
    image_steps,
    run_cli,
    toy_study,
    two_logged_trials,
)
from tune import search, search_tracking
from tune.plan import load_plan

pytestmark = pytest.mark.usefixtures("fast_system_metrics")

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------
# Search and trial runs, run status


def test_trial_run_is_a_child_found_again_by_its_trial_id(client):
    parent = search_tracking.open_search_run(client, "search-a", {"preset": "digits"})
    child = tracking.open_trial_run(client, parent, "trial_0001", optuna_trial_number=0)
    tracking.end_run(client, child, KeyboardInterrupt())
    assert client.get_run(child).info.status == "KILLED"

    assert search_tracking.open_search_run(client, "search-a", {"preset": "digits"}, resume=True) == parent
    assert search_tracking.open_search_run(client, "search-a", {"preset": "digits"}) != parent  # a new search
    assert tracking.open_trial_run(client, parent, "trial_0001", optuna_trial_number=0) == child
    run = client.get_run(child)
    assert run.info.status == "RUNNING"
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.data.tags[tracking.TAG_TRIAL_ID] == "trial_0001"
    assert run.data.tags[tracking.TAG_OPTUNA_TRIAL] == "0"
    stopped = tracking.open_trial_run(client, parent, "trial_0002")
    assert stopped != child

    # The search's end: trial_0002 was stopped early by the scheduler; trial_0001 has no outcome.
    search_tracking.end_trial_runs(client, parent, {"trial_0002": ("FINISHED", "early-stopped")})
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(stopped).info.status == "FINISHED"
    assert client.get_run(stopped).data.tags[search_tracking.TAG_STOP_REASON] == "early-stopped"


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (KeyboardInterrupt(), "KILLED"),
                                           (RuntimeError("boom"), "FAILED")])
def test_ended_run_sets_the_status_from_how_the_block_exits(client, error, status):
    run_id = search_tracking.open_search_run(client, f"status-{status}", {})
    with contextlib.suppress(BaseException), tracking.ended_run(client, run_id):
        if error is not None:
            raise error
    assert client.get_run(run_id).info.status == status


def test_resumed_tracker_skips_epochs_already_logged(client, digits_teacher):
    cfg = preset("digits")
    run_id = search_tracking.open_search_run(client, "resume-metrics", {})
    tracking.log_epoch_metrics(client, run_id, {"epoch": 0, "loss/generator": 1.0})
    tracker = tracking.RunTracker(client, run_id, cfg, digits_teacher[1])
    tracker.on_epoch({"epoch": 0, "loss/generator": 2.0}, distiller=None)  # re-trained after a restore
    tracker.end()
    assert [m.value for m in client.get_metric_history(run_id, "loss/generator")] == [1.0]


class NonFiniteLoss(FloatingPointError):
    """Stands for the error a run that fails late raises after logging its best-so-far student."""


def test_a_run_failing_after_logging_its_student_ends_failed_with_the_model_and_the_reason(
        client, digits_teacher):
    cfg = preset("digits")
    student, meta = load_teacher(digits_teacher[0], cfg)  # any real model of the right shape
    run_id = tracking.open_distill_run(client, cfg)
    with pytest.raises(NonFiniteLoss), tracking.tracked_run(client, run_id, cfg, meta, digits_teacher[0]) as run:
        model_uri = run.log_student(student, dict(meta, best_epoch=1))
        run.tag_failure("loss/student_total is nan at epoch 3")
        raise NonFiniteLoss("loss/student_total is nan at epoch 3")
    finished = client.get_run(run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags[tracking.TAG_FAILURE] == "loss/student_total is nan at epoch 3"
    assert finished.data.tags[tracking.TAG_MODEL_URI] == model_uri
    [output] = finished.outputs.model_outputs
    # best_epoch 1 is the second epoch, whose metrics MLflow holds at step 2
    assert f"models:/{output.model_id}" == model_uri and output.step == 2
    assert str(client.get_logged_model(output.model_id).status) == "READY"
    images = torch.zeros(2, 1, 8, 8)
    assert torch.equal(mlflow.pytorch.load_model(model_uri)(images), student.eval()(images))


def test_a_continued_run_drops_the_failure_reason_of_its_earlier_attempt(client):
    parent = search_tracking.open_search_run(client, "failed-then-resumed", {})
    child = tracking.open_trial_run(client, parent, "trial_0001")
    tracking.tag_failure(client, child, "x" * 10_000)  # cut to what a tag holds, not refused
    assert len(client.get_run(child).data.tags[tracking.TAG_FAILURE]) == 8000
    tracking.end_run(client, child, RuntimeError("late failure"))

    assert tracking.open_trial_run(client, parent, "trial_0001") == child  # a resumed trial
    assert tracking.TAG_FAILURE not in client.get_run(child).data.tags
    tracking.tag_failure(client, child, "second attempt failed too")
    tracking.RunTarget(client.tracking_uri, run_id=child).open(client)  # a restarted worker group
    run = client.get_run(child)
    assert run.info.status == "RUNNING" and tracking.TAG_FAILURE not in run.data.tags


# ----------------------------------------------------------------------------------------
# Pictures and tables


def test_image_grid_is_uint8_and_leaves_the_generator_and_rng_alone():
    torch.manual_seed(0)
    generator = build_generator(32, 8, 1, 16)
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    rng = torch.get_rng_state()
    grid = tracking.generated_image_grid(generator, 32, [0.3], [0.4], samples=64)
    assert grid.dtype.name == "uint8" and grid.shape == (8 * 9 + 1, 8 * 9 + 1, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
    assert (grid == tracking.generated_image_grid(generator, 32, [0.3], [0.4], samples=64)).all()


class ConstantTeacher(torch.nn.Module):
    """Gives every image the same class."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_image_grid_tiles_carry_the_teachers_labels():
    torch.manual_seed(0)
    generator = build_generator(32, 8, 1, 16)
    sevens = tracking.generated_image_grid(generator, 32, [0.3], [0.4], samples=64, teacher=ConstantTeacher(7))
    ones = tracking.generated_image_grid(generator, 32, [0.3], [0.4], samples=64, teacher=ConstantTeacher(1))
    tile = 32  # 8-pixel samples upscaled 4x to carry a label
    assert sevens.dtype.name == "uint8" and sevens.shape == ones.shape == (8 * (tile + 1) + 1,) * 2 + (3,)
    rows, cols = np.nonzero((sevens != ones).any(axis=2))
    assert len(rows) > 0  # the labels differ...
    within = ((rows - 1) % (tile + 1) < tile // 2) & ((cols - 1) % (tile + 1) < tile // 2)
    assert within.all()  # ...only in each tile's top-left corner, where its label is written


def test_search_plots_and_results_table_on_the_parent_run(client, tmp_path):
    run_id = search_tracking.open_search_run(client, "plots", {})
    study = toy_study(6)
    written = search_tracking.log_search_plots(client, run_id, study)
    search_tracking.log_results_table(client, run_id, study.trials_dataframe())
    plots = sorted(f.path for f in client.list_artifacts(run_id, "plots"))
    assert plots == sorted(written) == ["plots/optimization_history.html", "plots/parallel_coordinate.html",
                                        "plots/param_importances.html", "plots/validation_per_epoch.html"]
    page = Path(client.download_artifacts(run_id, "plots/parallel_coordinate.html", str(tmp_path))).read_text()
    assert "plotly" in page.lower() and "meta_lr" in page  # an interactive page with the knobs on its axes
    table = client.download_artifacts(run_id, "results/trials.parquet", str(tmp_path))
    assert len(pd.read_parquet(table)) == 6


def test_param_importances_need_two_trials(client):
    run_id = search_tracking.open_search_run(client, "one-trial", {})
    assert "plots/param_importances.html" not in search_tracking.log_search_plots(client, run_id, toy_study(1))
    assert search_tracking.log_search_plots(client, run_id, optuna.create_study()) == []


# ----------------------------------------------------------------------------------------
# Tracking URIs


def test_relative_sqlite_uri_becomes_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_unreachable_tracking_server_fails_fast_before_anything_starts(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    # No --teacher: a reachable store would first train one into the data folder.
    code, result, err = run_cli([*DISTILL, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                                 "--tracking-uri", uri])
    assert code == 2 and result is None
    assert f"--tracking-uri {uri}: no MLflow tracking server reachable there" in err
    assert time.perf_counter() - start < 15
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    code, _, err = run_cli(["eval", "--model", "models:/x@champion", "--preset", "digits", "--tracking-uri", uri])
    assert code == 2 and "no MLflow tracking server reachable" in err


def test_sqlite_store_in_a_missing_folder_is_a_clear_error(tmp_path):
    code, _, err = run_cli([*DISTILL, "--tracking-uri", f"sqlite:///{tmp_path}/nope/mlflow.db"])
    assert code == 2 and "does not exist" in err


# ----------------------------------------------------------------------------------------
# A real tracking server (integration tier)


@pytest.mark.slow
def test_smoke_search_logs_parent_children_plots_and_a_champion(finished_smoke_search, tmp_path):
    search_run, epochs = finished_smoke_search, 3
    assert search_run.done.returncode == 0, search_run.done.stderr[-3000:]
    client = tracking.connect(search_run.tracking_uri)
    parent, children = search_runs(search_run.storage, search_run.name, client)
    assert parent.info.status == "FINISHED" and parent.data.params["preset"] == "digits"
    plan = load_plan(str(search_run.storage), search_run.name)
    assert {f"space.{name}": knob.describe() for name, knob in plan.space.items()}.items() <= parent.data.params.items()
    # What Ray detects on this one machine (cgroup limits included), as the search's local Ray did.
    assert parent.data.tags["lrra.cluster.nodes"] == "1"
    assert float(parent.data.tags["lrra.cluster.cpus"]) == ray_detected_cpus()
    assert sorted(f.path for f in client.list_artifacts(parent.info.run_id, "plots")) == [
        "plots/optimization_history.html", "plots/parallel_coordinate.html", "plots/param_importances.html",
        "plots/validation_per_epoch.html"]
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "results")] == ["results/trials.parquet"]

    # The preset's trial and its memory counterpart ran to the end (ASHA spares both); ASHA stopped the useless one
    # after its first epoch. Every trial's run ends FINISHED, tagged with why it ended.
    by_trial = {r.data.tags[tracking.TAG_OPTUNA_TRIAL]: r for r in children}
    assert sorted(by_trial) == ["0", "1", "2"] and {r.info.status for r in children} == {"FINISHED"}
    for number, reason in {"0": "completed", "1": "completed", "2": "early-stopped"}.items():
        run = by_trial[number]
        assert run.data.tags[search_tracking.TAG_STOP_REASON] == reason
        logged = epochs_logged(client, run)
        if reason == "completed":
            assert logged == list(range(1, epochs + 1))
        else:  # stopped after its first epoch's report; it may have logged the next before it was killed
            assert logged == list(range(1, len(logged) + 1)) and 1 <= len(logged) < epochs
        assert 1 in image_steps(client, run.info.run_id)
        assert run.data.params["epochs"] == str(epochs)

    logged = [r for r in children if tracking.TAG_MODEL_URI in r.data.tags]
    best = max(logged, key=lambda r: r.data.metrics["val/best_student_acc"])  # chosen on validation
    champion = client.get_model_version_by_alias("lrra-digits-student", "champion")
    assert champion.source == best.data.tags[tracking.TAG_MODEL_URI]
    assert float(champion.tags[tracking.VERSION_ACCURACY_TAG]) == best.data.metrics["val/best_student_acc"]
    assert float(champion.tags["test_accuracy"]) == best.data.metrics["test/best_student_acc"]
    code, evaluated, err = run_cli(["eval", "--model", "models:/lrra-digits-student@champion", "--preset", "digits",
                                    "--data-dir", str(tmp_path), "--tracking-uri", search_run.tracking_uri])
    assert code == 0, err
    assert evaluated["test_accuracy"] == best.data.metrics["test/best_student_acc"]


def test_search_with_an_unreachable_tracking_server_starts_nothing(tmp_path, capsys):
    started = time.monotonic()
    uri = f"http://127.0.0.1:{free_port()}"
    code = search.main(["--preset", "digits", "--storage-path", str(tmp_path / "runs"),
                        "--data-dir", str(tmp_path / "data"), "--tracking-uri", uri])
    assert code == 2 and time.monotonic() - started < 15
    assert f"--tracking-uri {uri}: no MLflow tracking server reachable there" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_distill_register_and_eval_through_a_tracking_server(tracking_server, digits_teacher, tmp_path):
    result = distill_into(tracking_server, digits_teacher[0], tmp_path)
    client = tracking.connect(tracking_server)
    check_distill_run(client, result)
    assert client.get_run(result["mlflow_run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")
    # Its own registered model: the searches in this module register lrra-digits-student.
    check_eval_reproduces(client, result, tracking_server, tmp_path, "lrra-digits-distill-student")


def test_a_finished_search_summarises_its_trials_on_the_parent_run(client):
    tracker = two_logged_trials(client, "summary")
    study = toy_study(2)
    outcomes = {"trial_a": ("KILLED", "early-stopped"), "trial_b": ("FINISHED", "completed")}
    tracker.finish(study, study.trials_dataframe(), outcomes, preset("digits"), interrupted=True,
                   best_student=search_tracking.best_logged_student(client, tracker.run_id))
    tracker.end()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["search/trials_completed"] == 1 and metrics["search/trials_early_stopped"] == 1
    assert metrics["search/best_val_acc"] == 0.8
