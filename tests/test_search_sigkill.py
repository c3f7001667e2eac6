"""A search driver killed with SIGKILL at three moments of its first trial, then `--resume`: every
trial finishes once, in Tune, in Optuna and in MLflow."""

from collections import Counter

import pytest
from ray.tune import ExperimentAnalysis

from lrra import tracking
from tests.search_records import (
    SEARCH_TIMEOUT_S,
    assert_study_matches_results,
    first_trial,
    results_of,
    run_search,
    search_runs,
    study_of,
)
from tests.services import search_command
from tune.study import STOP_REASON, TUNE_TRIAL_ID


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
