"""A search cut short, through `tune/search.py` as a user runs it: the time budget stops the running
trial, and a trial whose loss diverges ends with its best student kept. Each runs its own search."""

import os

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lrra import fault_injection, tracking
from lrra.metric_names import TEST_METRIC
from tests.search_records import results_of, run_search, search_runs, study_of
from tests.services import search_command
from tune import search_tracking
from tune.study import BEST_STUDENT_TRIAL, STOP_REASON


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
    # from its second epoch on, the first trial's pace says the budget will cut it (tune/budget_forecast.py)
    assert done.stderr.count("lets the first trials finish") == (rows[0]["epochs"] >= 2)

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
    # the summary's best student is the one registered: the best logged, a cut trial's here
    champion = search_tracking.best_logged_student(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), parent.info.run_id)
    number = next(row["optuna_trial_number"] for row in rows if row["tune_trial_id"] == champion.trial_id)
    assert f"validation {champion.val_accuracy:.4f}  (trial {number}, time budget" in done.stdout
    assert f"best student model     {champion.model_uri}" in done.stdout
    # ...and the study names it too (Optuna's own best_trial counts complete trials only)
    assert study_of(tmp_path, "budget").user_attrs[BEST_STUDENT_TRIAL] == number


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
