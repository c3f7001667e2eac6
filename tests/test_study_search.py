"""tune/study.py's StudySearch, Ray Tune's OptunaSearch with the study as the record of truth, against a
real SQLite study and no Ray: restored stale snapshots, trials taken over, settled and diverged."""

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lrra import tracking
from tune import search, search_tracking, space
from tune.study import STOP_REASON, TUNE_TRIAL_ID

# ----------------------------------------------------------------------------------------
# StudySearch against a real SQLite study (no Ray): restored stale snapshots, diverged trials.


@pytest.fixture
def new_searcher(tmp_path):
    """``make() -> StudySearch`` on one SQLite study of the digits space; each call is a fresh
    searcher on the same study, as a resumed driver's."""
    from lrra.config import preset
    from tune.study import StudySearch, open_storage

    cfg = preset("digits", epochs=3)
    knobs = space.build_space("digits", {}, set(), cfg)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")

    def make() -> StudySearch:
        return StudySearch(knobs, storage=storage, study_name="s", seed=0, epochs=3,
                           points_to_evaluate=space.baseline_points(knobs, cfg), n_startup_trials=2)

    return make


def asked_trials(searcher) -> list:
    """The study's trials that were asked (points enqueued but not yet asked are WAITING)."""
    study = optuna.load_study(study_name="s", storage=searcher.study_storage)
    return [t for t in study.trials if t.state != TrialState.WAITING]


def epoch_result(epoch: int, acc: float, **extra) -> dict:
    return {"epochs_done": epoch, "val/student_acc": acc, "val/best_student_acc": acc, **extra}


def snapshot(searcher, path: Path):
    """What Tune does every ~10 s: save the searcher, to restore it on --resume."""
    searcher.save(str(path))
    return path


def restored(new_searcher, path: Path):
    searcher = new_searcher()
    searcher.restore(str(path))
    return searcher


def test_a_restored_searcher_leaves_trials_that_the_study_finished_alone(new_searcher, tmp_path):
    searcher = new_searcher()
    searcher.suggest("a")
    searcher.on_trial_result("a", epoch_result(1, 0.2))
    stale = snapshot(searcher, tmp_path / "searcher.pkl")  # Tune saved here; the driver goes on...
    searcher.on_trial_result("a", epoch_result(2, 0.3))
    searcher.on_trial_complete("a", epoch_result(3, 0.4))  # ...the trial ends, then the driver is killed

    again = restored(new_searcher, stale)  # --resume: Tune runs "a" again, which reports its end again
    again.on_trial_result("a", epoch_result(3, 0.4))
    again.on_trial_complete("a", epoch_result(3, 0.4))

    (trial,) = asked_trials(searcher)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.4)
    assert trial.intermediate_values == {1: 0.2, 2: 0.3, 3: 0.4}


def test_a_trial_asked_after_the_last_snapshot_is_taken_over_by_the_next_tune_trial(new_searcher, tmp_path):
    searcher = new_searcher()
    searcher.suggest("a")
    searcher.on_trial_complete("a", epoch_result(3, 0.4))
    stale = snapshot(searcher, tmp_path / "searcher.pkl")
    lost = searcher.suggest("b")  # asked, then the driver is killed before Tune saves "b"

    again = restored(new_searcher, stale)
    taken_over = again.suggest("c")
    assert taken_over == lost  # the same planned configuration (the memory counterpart), same Optuna number
    again.on_trial_complete("c", epoch_result(3, 0.5))

    trials = asked_trials(searcher)
    assert [t.user_attrs[TUNE_TRIAL_ID] for t in trials] == ["a", "c"]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def test_settling_closes_the_running_trials_that_no_tune_trial_continues(new_searcher, tmp_path):
    from tune.study import settle_unfinished

    searcher = new_searcher()
    for tune_id in ("a", "b", "c"):
        searcher.suggest(tune_id)
    searcher.on_trial_result("a", epoch_result(1, 0.3))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")  # as run_search does
    # The time budget ended "a" and "c"; "c" will resume; "b" was asked after Tune's last save.
    assert settle_unfinished(study, searcher.study_storage, {"c"}, {"a", "c"}, "time budget") == 2
    by_tune_id = {t.user_attrs[TUNE_TRIAL_ID]: t for t in asked_trials(searcher)}
    assert (by_tune_id["a"].state, by_tune_id["a"].user_attrs[STOP_REASON]) == (TrialState.PRUNED, "time budget")
    assert (by_tune_id["b"].state, by_tune_id["b"].user_attrs[STOP_REASON]) == (TrialState.FAIL, "abandoned")
    assert by_tune_id["c"].state == TrialState.RUNNING and STOP_REASON not in by_tune_id["c"].user_attrs


def test_a_completed_trials_value_is_its_kept_students_the_champions_figure(new_searcher):
    """The best epoch's student is the one kept and registered: Optuna's value is its validation
    accuracy, not the last epoch's, while the intermediate values stay each epoch's."""
    searcher = new_searcher()
    searcher.suggest("a")
    searcher.on_trial_result("a", epoch_result(1, 0.5))
    searcher.on_trial_result("a", epoch_result(2, 0.6))
    searcher.on_trial_complete("a", {**epoch_result(3, 0.55), "val/best_student_acc": 0.6})
    (trial,) = asked_trials(searcher)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.6)
    assert trial.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.55}


def test_a_diverged_trial_fails_with_its_best_accuracy_kept(new_searcher, tmp_path):
    from tune.report import ending
    from tune.study import trial_rows

    searcher = new_searcher()
    searcher.suggest("a")
    searcher.on_trial_result("a", epoch_result(1, 0.3))
    searcher.on_trial_result("a", epoch_result(2, 0.25))
    last = {**epoch_result(2, 0.25), "val/best_student_acc": 0.3, "diverged": 1}  # epoch 3 went NaN
    searcher.on_trial_result("a", last)
    searcher.on_trial_complete("a", last)
    searcher.suggest("b")  # the search goes on

    study = optuna.load_study(study_name="s", storage=searcher.study_storage)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs[STOP_REASON] == "diverged"
    assert trial.intermediate_values == {1: 0.3, 2: 0.25}
    row = trial_rows(study, list(trial.distributions), str(tmp_path))[0]  # the knobs: every one was asked
    assert (row["stop_reason"], row["best_val_acc"], row["epochs"]) == ("diverged", 0.3, 2)
    assert ending(last, epochs=3) == "diverged at epoch 3 (non-finite loss), best acc 0.3000"
    assert search.trial_outcomes([row])["a"] == (tracking.FAILED, "diverged")


def test_a_diverged_trial_run_ends_failed_although_its_worker_finished_it(tmp_path):
    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = search_tracking.open_search_run(client, "search-x", {})
    child = tracking.open_trial_run(client, parent, "a", optuna_trial_number=0)
    client.set_terminated(child, tracking.FINISHED)  # the worker returned normally after the NaN
    search_tracking.end_trial_runs(client, parent, {"a": (tracking.FAILED, "diverged")})
    run = client.get_run(child)
    assert run.info.status == tracking.FAILED and run.data.tags[search_tracking.TAG_STOP_REASON] == "diverged"


def test_the_summarys_best_student_is_the_registered_champion_even_from_a_cut_trial():
    """A trial cut by the time budget keeps its best epoch's student, logged like a completed trial's;
    when it beats every completed trial on validation it is the champion, and the summary says so."""
    from tune.report import best_row
    from tune.search_tracking import LoggedStudent

    def row(number, reason, best, final):
        return {"optuna_trial_number": number, "tune_trial_id": f"t{number}", "stop_reason": reason,
                "best_val_acc": best, "final_val_acc": final, "test_acc": None, "epochs": 30}

    rows = [row(0, "completed", 0.967, 0.9645), row(1, "completed", 0.9595, 0.948),
            row(4, "time budget", 0.974, 0.974), row(5, "early-stopped", 0.98, 0.90)]
    champion = LoggedStudent("models:/m-4", 0.9745, 0.96975, "t4")
    best = best_row(rows, champion)
    assert (best["optuna_trial_number"], best["best_val_acc"], best["test_acc"]) == (4, 0.9745, 0.96975)
    # Without a logged student (an interrupted search): the best completed trial, as before.
    assert best_row(rows)["optuna_trial_number"] == 0
