"""A search interrupted with Ctrl-C while its second trial runs, then `--resume`, tracked by a real
`mlflow server`: one MLflow run per trial and none left RUNNING; the interrupted trial continues
from its last checkpoint."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lrra import tracking
from tests.search_records import epochs_logged, run_search, search_runs, study_of
from tests.services import search_command
from tune import search
from tune.study import TUNE_TRIAL_ID


def two_trial_search(storage: Path, teacher: Path, uri: str | None, *args: str) -> list[str]:
    """A two-trial smoke search that no budget cuts."""
    return search_command(storage, teacher, "--num-samples", "2", "--time-budget", "none",
                          *(["--tracking-uri", uri] if uri else []), *args)


def second_trial_is_midway(client: MlflowClient, storage: Path, name: str) -> bool:
    """The first trial's run has finished and the second has logged at least one epoch."""
    try:
        _, children = search_runs(storage, name, client)
    except LookupError:
        return False
    by_number = {r.data.tags.get(tracking.TAG_OPTUNA_TRIAL): r for r in children}
    return ("0" in by_number and by_number["0"].info.status == "FINISHED"
            and "1" in by_number and len(epochs_logged(client, by_number["1"])) >= 1)


@pytest.mark.slow
def test_interrupted_and_resumed_search_keeps_one_run_per_trial_and_none_running(
        tracking_server, digits_teacher, tmp_path, interrupt_search):
    epochs = 5  # the second trial must still be running when the signal lands
    # One trial at a time whatever the machine's cores: the first finishes before the second starts.
    command = two_trial_search(tmp_path, digits_teacher[0], tracking_server, "--name", "resumed", "--epochs",
                               str(epochs), "--grace-period", str(epochs), "--max-concurrent-trials", "1")
    client = tracking.connect(tracking_server)
    code, stderr = interrupt_search(command, lambda: second_trial_is_midway(client, tmp_path, "resumed"),
                                    wait_s=600, stop_s=180)
    assert code == search.EXIT_INTERRUPTED, stderr[-3000:]
    assert "--resume resumed" in stderr
    parent, children = search_runs(tmp_path, "resumed", client)
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in children}
    study = study_of(tmp_path, "resumed")
    interrupted = study.trials[1]
    assert interrupted.state == TrialState.RUNNING  # kept for the resumed search to continue
    epochs_before = len(interrupted.intermediate_values)
    assert epochs_before < epochs

    # No --tracking-uri: the search logs to the server it started with, not to $MLFLOW_TRACKING_URI.
    resumed = run_search(two_trial_search(tmp_path, digits_teacher[0], None, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent_after, children = search_runs(tmp_path, "resumed", client)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    trial_ids = [r.data.tags[tracking.TAG_TRIAL_ID] for r in children]
    assert len(trial_ids) == len(set(trial_ids)) == 2  # one run per trial: the resumed trial continued its own
    assert {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        # each epoch once, though re-trained after resume
        assert epochs_logged(client, run) == list(range(1, epochs + 1))

    # Optuna: both trials complete, none RUNNING; the interrupted one kept its Tune trial and went on
    # from its last checkpoint, not from scratch (its result.json after the resume starts later).
    study = study_of(tmp_path, "resumed")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    tune_id = interrupted.user_attrs[TUNE_TRIAL_ID]
    assert study.trials[1].user_attrs[TUNE_TRIAL_ID] == tune_id
    result_file = next((tmp_path / "resumed").glob(f"*{tune_id}*/result.json"))
    resumed_epochs = [json.loads(line)["epochs_done"] for line in result_file.read_text().splitlines()]
    assert resumed_epochs == list(range(resumed_epochs[0], epochs + 1)) and resumed_epochs[0] > epochs_before
