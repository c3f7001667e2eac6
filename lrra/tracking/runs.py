"""A run's lifecycle: tags, opening (new, found again, a trial's child run), and ending.

Every run is addressed by its id through ``MlflowClient``, never through mlflow's active-run
stack: a search's parent run belongs to the driver, while each trial's child run is opened by
the trial's process and written by its Ray Train rank-0 worker, possibly on another node. A
child run carries the ``mlflow.parentRunId`` tag and is found again by its Tune trial id
(``lrra.trial_id``), so a resumed trial continues its own run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from lrra.config import LRRAConfig
from lrra.tracking.store import ensure_experiment

DISTILL_EXPERIMENT = "lrra-distill"

TAG_KIND = "lrra.kind"                           # "distill", "search", "trial" or (a logged model) "student"
TAG_TRIAL_ID = "lrra.trial_id"                   # the Tune trial id: finds a trial's run on resume
TAG_OPTUNA_TRIAL = "lrra.optuna_trial_number"
TAG_TEACHER_PATH = "lrra.teacher_path"
TAG_MODEL_URI = "lrra.model_uri"                 # the run's logged best student
TAG_FAILURE = "lrra.failure"                     # why a FAILED run failed, in words (tag_failure)

RUNNING, FINISHED, KILLED, FAILED = (RunStatus.to_string(s) for s in (
    RunStatus.RUNNING, RunStatus.FINISHED, RunStatus.KILLED, RunStatus.FAILED))

VERSIONED_PACKAGES = ("lrra", "torch", "ray", "optuna", "mlflow")


def version_tags() -> dict[str, str]:
    """``lrra.version.<package>`` for the packages a result depends on."""
    tags = {}
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"lrra.version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"lrra.version.{package}"] = "not installed"
    return tags


def tag_filter(tags: dict[str, str]) -> str:
    """A search_runs filter matching runs that carry all ``tags``."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the newest run of the experiment carrying all ``tags``, or None."""
    runs = client.search_runs([experiment_id], tag_filter(tags), max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def new_run(client: MlflowClient, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> str:
    return client.create_run(experiment_id, tags={**version_tags(), **tags}, run_name=run_name).info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Set a run that continues (a resumed trial, a restarted worker group) back to RUNNING.

    A failure reason left by an earlier attempt is removed: it described that attempt, and a
    continued run that then finishes must not read as failed.
    """
    client.update_run(run_id, status=RUNNING)
    if TAG_FAILURE in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, TAG_FAILURE)


def open_run(client: MlflowClient, experiment_id: str, tags: dict[str, str], run_name: str | None = None) -> str:
    """Continue the run carrying ``tags`` (reopen_run) or create it; returns its id."""
    run_id = find_run(client, experiment_id, tags)
    if run_id is None:
        return new_run(client, experiment_id, tags, run_name)
    reopen_run(client, run_id)
    return run_id


def trial_run_name(trial_id: str, optuna_trial_number: int | None) -> str:
    """``trial-05 · 107ed640``: Optuna's trial number (what its dashboard shows), then Tune's trial id
    (what names the trial's folder), so one name finds the trial in every tool."""
    return f"trial-{optuna_trial_number:02d} · {trial_id}" if optuna_trial_number is not None else trial_id


def open_trial_run(client: MlflowClient, parent_run_id: str, trial_id: str, *,
                   optuna_trial_number: int | None = None) -> str:
    """A trial's child run under ``parent_run_id`` (named after the trial), continued when it resumes."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    tags = {TAG_KIND: "trial", MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_TRIAL_ID: trial_id}
    if optuna_trial_number is not None:
        # An Optuna trial that a resumed search runs under a new Tune trial id (the first was lost
        # with a killed driver) continues its own run: one run per Optuna trial.
        same_optuna_trial = {TAG_KIND: "trial", MLFLOW_PARENT_RUN_ID: parent_run_id,
                             TAG_OPTUNA_TRIAL: str(optuna_trial_number)}
        earlier = find_run(client, experiment_id, same_optuna_trial)
        if earlier is not None:
            client.set_tag(earlier, TAG_TRIAL_ID, trial_id)
    run_id = open_run(client, experiment_id, tags, run_name=trial_run_name(trial_id, optuna_trial_number))
    if optuna_trial_number is not None:
        client.set_tag(run_id, TAG_OPTUNA_TRIAL, str(optuna_trial_number))
    return run_id


def open_distill_run(client: MlflowClient, cfg: LRRAConfig, run_name: str | None = None) -> str:
    """A top-level run for a `distill` outside any search (always a new run)."""
    return new_run(client, ensure_experiment(client, DISTILL_EXPERIMENT), {TAG_KIND: "distill"},
                   run_name or cfg.preset)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params as strings. Re-logging an identical value (a resumed run) is accepted by MLflow."""
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


def log_run_inputs(client: MlflowClient, run_id: str, cfg: LRRAConfig, teacher_meta: dict[str, Any],
                   teacher_path: str | os.PathLike) -> None:
    """The full config as params, plus the teacher it distils."""
    log_params(client, run_id, {**cfg.to_dict(), "teacher.test_accuracy": teacher_meta["test_accuracy"]})
    client.set_tag(run_id, TAG_TEACHER_PATH, str(teacher_path))


def tag_failure(client: MlflowClient, run_id: str, reason: str) -> None:
    """Say on the run why it failed (tag ``lrra.failure``), e.g. before it is ended FAILED.

    For whoever ends a run that failed in a known way (a non-finite loss after its best-so-far
    student was logged): the status alone says only FAILED. Long reasons are cut to what an
    MLflow tag holds.
    """
    client.set_tag(run_id, TAG_FAILURE, reason[:MAX_TAG_VAL_LENGTH])


def run_status_for(error: BaseException | None) -> str:
    """FINISHED, KILLED for an interruption (Ctrl-C, SystemExit), FAILED for any other error."""
    if error is None:
        return FINISHED
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return KILLED
    return FAILED


def end_run(client: MlflowClient, run_id: str, error: BaseException | None = None) -> None:
    client.set_terminated(run_id, run_status_for(error))


@contextmanager
def ending_with_block(end: Callable[[BaseException | None], None]) -> Iterator[None]:
    """Calls ``end(error)`` as the block exits: with the error that escapes it, else with None."""
    try:
        yield
    except BaseException as error:
        end(error)
        raise
    end(None)


@contextmanager
def ended_run(client: MlflowClient, run_id: str) -> Iterator[str]:
    """Ends ``run_id`` FINISHED, KILLED or FAILED according to how the block exits."""
    with ending_with_block(lambda error: end_run(client, run_id, error)):
        yield run_id
