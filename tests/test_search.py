"""tune/search.py end to end: real Ray, a real Optuna SQLite study, the digits preset, tiny budgets.

Searches run as subprocesses (``python tune/search.py ...``), as a user runs them: each starts
a private local Ray that ends with it. Bad input is checked through ``main()`` in this process,
where it must fail before Ray starts.
"""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import ray
from mlflow import MlflowClient
from optuna.trial import TrialState
from ray.tune import ExperimentAnalysis

from lrra import fault_injection, tracking
from lrra.metric_names import TEST_METRIC
from tests.services import search_command
from tune import search, search_tracking
from tune.study import STOP_REASON, TUNE_TRIAL_ID

ROOT = Path(__file__).resolve().parent.parent

SEARCH = ROOT / "tune" / "search.py"
SEARCH_TIMEOUT_S = 600  # a guard against hangs, not a speed target: CI machines can be busy


def run_search(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``env``: variables added to this process's environment for the search."""
    return subprocess.run(command, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def study_of(storage: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage / 'optuna.db'}")


def results_of(storage: Path, name: str) -> list[dict]:
    return pq.read_table(storage / name / "results.parquet").to_pylist()


def assert_study_matches_results(study: optuna.Study, rows: list[dict], trials: int) -> None:
    """``trials`` finished trials with values, none RUNNING, and one parquet row for each."""
    assert len(study.trials) == trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None for t in study.trials)
    by_number = {row["optuna_trial_number"]: row for row in rows}
    assert sorted(by_number) == [t.number for t in study.trials]
    for trial in study.trials:
        row = by_number[trial.number]
        assert row["tune_trial_id"] == trial.user_attrs[TUNE_TRIAL_ID]
        assert row["state"] == trial.state.name
        # Optuna's value: a completed trial's kept (best-epoch) student, a stopped one's last epoch.
        kept = row["best_val_acc"] if trial.state == TrialState.COMPLETE else row["final_val_acc"]
        assert kept == pytest.approx(trial.value)
        # A completed trial's chosen student is scored once on the test split, reported beside it.
        assert (row["test_acc"] is not None) == (trial.state == TrialState.COMPLETE)
        assert row["epochs"] == max(trial.intermediate_values)
        assert all(row[name] == pytest.approx(value) for name, value in trial.params.items())
    assert len({row["tune_trial_id"] for row in rows}) == trials  # no trial ran twice


# ----------------------------------------------------------------------------------------
# One uninterrupted smoke search: the study, the parquet file and ASHA.


@pytest.fixture
def smoke(finished_smoke_search):
    """(the search's completed process, its storage path) of the session's smoke search (conftest)."""
    return finished_smoke_search.done, finished_smoke_search.storage


@pytest.mark.slow
def test_smoke_search_fills_the_study_and_the_results_file(smoke):
    done, storage = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results_of(storage, "smoke")
    assert_study_matches_results(study_of(storage, "smoke"), rows, trials=3)
    assert {row["stop_reason"] for row in rows} <= {"completed", "early-stopped"}
    assert "best student           validation" in done.stdout and "its test accuracy" in done.stdout
    assert str(storage / "smoke" / "results.parquet") in done.stdout


@pytest.mark.slow
def test_smoke_search_output_is_plain_progress_lines(smoke):
    """Read as a log file (not a TTY): no Ray Tune tables or TensorBoard hint, no colour codes."""
    done, _ = smoke
    assert "Configuration for experiment" not in done.stdout and "tensorboard" not in done.stdout.lower()
    assert "\x1b[" not in done.stdout + done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert any(" trial 0 (" in line and "completed after 3 epoch(s)" in line for line in progress)
    assert not any("INFO" in line for line in done.stderr.splitlines())  # Optuna's and MLflow's INFO lines


@pytest.mark.slow
def test_asha_stops_the_useless_trial_at_its_first_rung(smoke):
    done, storage = smoke
    rows = {row["optuna_trial_number"]: row for row in results_of(storage, "smoke")}
    # The preset's point first (it has no memory), the same with LRRA's retention second, then --point.
    preset_trial, retention_trial, useless_trial = rows[0], rows[1], rows[2]
    assert (preset_trial["memory_capacity"], retention_trial["memory_capacity"]) == (0, 8)  # the digits space's most
    assert preset_trial["stop_reason"] == "completed" and preset_trial["epochs"] == 3
    assert useless_trial["student_lr"] == pytest.approx(1e-5)
    assert useless_trial["stop_reason"] == "early-stopped" and useless_trial["state"] == "PRUNED"
    assert useless_trial["epochs"] == 1
    assert useless_trial["best_val_acc"] < preset_trial["best_val_acc"]


@pytest.mark.slow
def test_the_time_budget_cuts_the_running_trial_and_the_records_say_so(tmp_path, digits_teacher):
    # 1000 epochs (~0.5 s each) cannot end within 40 s: the budget stops the first trial midway,
    # after the few seconds a trial needs to start and report its first epochs.
    # One trial at a time: two would meet at ASHA's first rung, and one be stopped early instead.
    done = run_search(search_command(tmp_path, digits_teacher[0], "--name", "budget", "--epochs", "1000",
                                     "--time-budget", "40", "--max-concurrent-trials", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results_of(tmp_path, "budget")
    asked = [t for t in study_of(tmp_path, "budget").trials if t.state != TrialState.WAITING]  # WAITING: never run
    assert rows and [row["optuna_trial_number"] for row in rows] == [t.number for t in asked]
    for row, trial in zip(rows, asked, strict=True):
        assert trial.state == TrialState.PRUNED and trial.user_attrs[STOP_REASON] == "time budget"
        assert 1 <= row["epochs"] < 1000  # it reported epochs, and was cut before its last
        assert trial.value == pytest.approx(trial.intermediate_values[row["epochs"]]) == row["final_val_acc"]
    assert f"cut by the time budget {len(rows)}" in done.stdout

    parent, children = search_runs(tmp_path, "budget")
    assert parent.info.status == tracking.FINISHED
    assert sorted(run.data.tags[tracking.TAG_TRIAL_ID] for run in children) == sorted(r["tune_trial_id"] for r in rows)
    assert all(run.info.status == tracking.KILLED for run in children)
    assert all(run.data.tags[search_tracking.TAG_STOP_REASON] == "time budget" for run in children)
    # each cut trial's kept student is restored from its last checkpoint, scored on test once and
    # logged to its run, so that the search still has a champion
    assert all(tracking.TAG_MODEL_URI in run.data.tags and TEST_METRIC in run.data.metrics for run in children)
    assert all(row["test_acc"] is not None for row in rows)
    assert "MLflow: registered lrra-digits-student" in done.stderr


@pytest.mark.slow
def test_a_trial_whose_loss_diverges_keeps_its_best_student_and_says_so(tmp_path, digits_teacher):
    """A trial that trains in its own process goes NaN at its third epoch (the test-only switch):
    the search finishes, the trial ends diverged with its two good epochs, and its MLflow run is
    FAILED, says why, and holds the best student, as does its folder."""
    done = run_search(search_command(tmp_path, digits_teacher[0], "--name", "nan", "--num-samples", "1"),
                      env={fault_injection.ENV: "nan_at_epoch=2"})
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = results_of(tmp_path, "nan")
    assert (row["stop_reason"], row["epochs"]) == ("diverged", 2) and row["best_val_acc"] > 0.1
    [trial] = study_of(tmp_path, "nan").trials
    assert trial.state == TrialState.FAIL and sorted(trial.intermediate_values) == [1, 2]
    assert "diverged 1" in done.stdout
    _, [child] = search_runs(tmp_path, "nan")
    assert child.info.status == tracking.FAILED
    assert "non-finite" in child.data.tags[tracking.TAG_FAILURE] and tracking.TAG_MODEL_URI in child.data.tags
    assert (tmp_path / "nan" / "train" / row["tune_trial_id"] / "best_student.pt").is_file()


# ----------------------------------------------------------------------------------------
# Interrupt and resume.


def second_trial_is_midway(storage: Path, name: str) -> bool:
    """The first trial has finished and the second has reported at least one epoch."""
    try:
        trials = study_of(storage, name).trials
    except KeyError:  # the study does not exist yet
        return False
    return (len(trials) >= 2 and trials[0].state.is_finished() and trials[1].state == TrialState.RUNNING
            and len(trials[1].intermediate_values) >= 1)


def trials_now(storage: Path, name: str) -> list:
    try:
        return study_of(storage, name).trials
    except KeyError:  # the study does not exist yet
        return []


def first_trial(storage: Path, name: str, *, reported: int = 0, finished: bool = False) -> bool:
    """The first trial has reported ``reported`` epochs or more, and is finished (or still running)."""
    trials = trials_now(storage, name)
    return (bool(trials) and trials[0].state.is_finished() == finished
            and trials[0].state != TrialState.WAITING and len(trials[0].intermediate_values) >= reported)


def search_runs(storage: Path, name: str) -> tuple:
    """(the search's MLflow parent run, its child runs) in the tests' MLflow store."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(search_tracking.SEARCH_EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{search_tracking.TAG_SEARCH}` = '{storage / name}'")
    assert len(parents) == 1
    return parents[0], search_tracking.child_runs(client, parents[0].info.run_id)


@pytest.mark.slow
def test_resume_after_sigkill_at_any_moment_finishes_every_trial_once(tmp_path, digits_teacher, kill_search):
    """The driver is SIGKILLed three times during the first trial: as it starts, midway, and right
    after it ends (Tune's state, saved every ~10 s, then still calls it running, and the next
    trial may be asked but unknown to Tune). Each --resume continues; the last one finishes."""
    name = "killed"
    command = search_command(tmp_path, digits_teacher[0], "--name", name)
    resume = search_command(tmp_path, digits_teacher[0], "--resume")
    kill_search(command, lambda: first_trial(tmp_path, name), wait_s=SEARCH_TIMEOUT_S)
    kill_search(resume, lambda: first_trial(tmp_path, name, reported=1), wait_s=SEARCH_TIMEOUT_S)
    kill_search(resume, lambda: first_trial(tmp_path, name, finished=True), wait_s=SEARCH_TIMEOUT_S)

    resumed = run_search(resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    study, rows = study_of(tmp_path, name), results_of(tmp_path, name)
    assert_study_matches_results(study, rows, trials=3)
    assert {t.user_attrs[STOP_REASON] for t in study.trials} <= {"completed", "early-stopped"}
    tune_ids = {t.trial_id: t.status for t in ExperimentAnalysis(str(tmp_path / name)).trials}
    assert tune_ids == {t.user_attrs[TUNE_TRIAL_ID]: "TERMINATED" for t in study.trials}

    parent, children = search_runs(tmp_path, name)
    assert parent.info.status == tracking.FINISHED
    per_trial = Counter(run.data.tags[tracking.TAG_TRIAL_ID] for run in children)
    assert per_trial == Counter(list(tune_ids))  # one child run per trial, no duplicate
    assert {run.info.status for run in children} == {tracking.FINISHED}


# ----------------------------------------------------------------------------------------
# Bad input: one clear message, exit 2, nothing started.


@pytest.fixture
def bad_input(tmp_path, capsys):
    """Runs main() on arguments that must fail fast; returns its stderr."""

    def run(*args: str) -> str:
        started = time.monotonic()
        code = search.main(["--storage-path", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), *args])
        assert code == 2
        assert time.monotonic() - started < 10
        assert not ray.is_initialized() and not (tmp_path / "runs").exists()
        return capsys.readouterr().err

    return run


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "digits", "--bound", "meta_lr=0.5:0.01"], "inverted bounds (low 0.5 > high 0.01)"),
    (["--preset", "digits", "--bound", "meta_lr=0.1:0.1"], "empty range"),
    (["--preset", "digits", "--bound", "kd_steps=4:"], "expected LOW:HIGH"),
    (["--preset", "digits", "--bound", "retention_order=0,3"], "config field 'retention_order' = 3 is invalid"),
    (["--preset", "digits", "--bound", "epochs=1:5"], "--bound epochs: not a searched knob"),
    (["--preset", "digits", "--time-budget", "soon"], "--time-budget soon"),
    (["--preset", "digits", "--max-concurrent-trials", "0"], "--max-concurrent-trials 0: must be >= 1"),
    (["--preset", "digits", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers there"),
])
def test_bad_input_fails_before_anything_starts(bad_input, args, message):
    assert message in bad_input(*args)


def test_a_teacher_of_another_preset_is_refused(bad_input, digits_teacher):
    err = bad_input("--preset", "mnist", "--teacher", str(digits_teacher[0]))
    assert "has image_size=8 but the config has image_size=32" in err


def test_a_space_file_with_bad_bounds_is_refused(bad_input, tmp_path):
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps({"student_lr": [0.3, 0.1]}))
    assert "inverted bounds" in bad_input("--preset", "digits", "--space-file", str(space_file))


@pytest.mark.slow
def test_unwritable_storage_exits_2_from_the_command_line(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SEARCH), "--preset", "digits", "--storage-path", str(a_file / "runs")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert f"--storage {a_file / 'runs'}: {a_file} is a file" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30
