"""Reading what a `tune/search.py` subprocess left behind: its Optuna study, its results file and
its MLflow runs; running one with a guard against hangs."""

import functools
import os
import subprocess
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.services import ROOT
from tune import search_tracking
from tune.study import TUNE_TRIAL_ID

SEARCH_TIMEOUT_S = 600  # a guard against hangs, not a speed target: CI machines can be busy


def run_search(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``env``: variables added to this process's environment for the search."""
    return subprocess.run(command, capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def study_of(storage: Path, name: str) -> optuna.Study:
    """The search's Optuna study, read fresh (no trial cached from an earlier call)."""
    return optuna.load_study(study_name=name, storage=optuna_storage(storage))


@functools.cache
def optuna_storage(storage: Path) -> optuna.storages.RDBStorage:
    """One storage object per study file: the tests poll studies while searches run, and opening
    the SQLite storage anew costs ~65 ms of CPU per poll against ~9 ms for reading it again, on
    a machine whose two cores the suite keeps busy."""
    return optuna.storages.RDBStorage(f"sqlite:///{storage / 'optuna.db'}")


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


def search_runs(storage: Path, name: str, client: MlflowClient | None = None) -> tuple:
    """(the search's MLflow parent run, its child runs); ``client`` defaults to the tests' store.
    LookupError while the search has not opened its parent run yet."""
    client = client or MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(search_tracking.SEARCH_EXPERIMENT)
    parents = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], f"tags.`{search_tracking.TAG_SEARCH}` = '{storage / name}'")
    if not parents:
        raise LookupError(f"no MLflow run of the search {storage / name} yet")
    assert len(parents) == 1
    return parents[0], search_tracking.child_runs(client, parents[0].info.run_id)


def epochs_logged(client: MlflowClient, run) -> list[int]:
    return [int(m.step) for m in client.get_metric_history(run.info.run_id, "val/student_acc")]
