"""A search in MLflow: its parent run, settling the trials' child runs, plots, table, the champion.

The driver's side only. Each trial's child run is opened by the trial's own process and
written by its rank-0 worker (lrra.tracking.targets.RunTarget); here the search finds them
again by the ``mlflow.parentRunId`` tag once its trials are over.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lrra.config import LRRAConfig
from lrra.metric_names import BEST_VALIDATION_METRIC, TEST_METRIC
from lrra.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_TRIAL_ID,
    RunTarget,
    connect,
    ending_with_block,
    ensure_experiment,
    log_params,
    new_run,
    open_run,
    register_champion,
    registered_model_name,
    run_status_for,
    tag_filter,
)
from tune.study import ABANDONED, COMPLETED, DIVERGED, EARLY_STOPPED, ERROR, TIME_BUDGET

SEARCH_EXPERIMENT = "lrra-search"
TAG_SEARCH = "lrra.search"                       # the search's experiment path: finds its parent run on --resume
TAG_STOP_REASON = "lrra.stop_reason"             # why a search trial ended
TAG_BEST_TRIAL = "lrra.best_trial"               # the parent run's: the champion's child run name

# How a trial's MLflow run ends, by the study's stop reason ("running": a trial --resume continues).
RUN_STATUS = {COMPLETED: FINISHED, EARLY_STOPPED: FINISHED, TIME_BUDGET: KILLED, DIVERGED: FAILED, ERROR: FAILED,
              ABANDONED: KILLED, "running": KILLED}


def run_status(stop_reason: str) -> str:
    """The MLflow status of a trial's run that ended for ``stop_reason`` (KILLED when unknown)."""
    return RUN_STATUS.get(stop_reason, KILLED)
SEARCH_MAX_RESULTS = 10_000                      # child runs read back at once (one per trial)


class SearchTracker:
    """The driver's side of a search: its parent run, the trials' child runs at the end, the champion."""

    def __init__(self, tracking_uri: str, search_id: str, params: dict[str, Any], *, resume: bool,
                 run_name: str, tags: dict[str, str]) -> None:
        self.client = connect(tracking_uri)
        self.run_id = open_search_run(self.client, search_id, params, resume=resume, run_name=run_name)
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.trial_target = RunTarget(tracking_uri, parent_run_id=self.run_id)
        self.knobs = searched_knobs(params)
        self.interrupted = False

    def finish(self, study, frame, outcomes: dict[str, tuple[str, str]], cfg: LRRAConfig,
               interrupted: bool, best_student: LoggedStudent | None) -> dict[str, Any] | None:
        """Settle the child runs, log the plots and the results table; register the champion when done.

        ``outcomes`` as in end_trial_runs. ``best_student``: best_logged_student's answer, which the
        search also prints. ``cfg``: the search's base config; the best student is registered under
        registered_model_name(cfg), named after the dataset actually distilled. An interrupted
        search registers nothing yet: its resumption will. Returns register_champion's answer (None
        when nothing was registered).
        """
        self.interrupted = interrupted
        end_trial_runs(self.client, self.run_id, outcomes)
        log_search_plots(self.client, self.run_id, study)
        log_results_table(self.client, self.run_id, frame)
        log_search_summary(self.client, self.run_id, [reason for _, reason in outcomes.values()])
        if interrupted or best_student is None:
            return None
        return register_champion(self.client, registered_model_name(cfg), best_student.model_uri,
                                 best_student.val_accuracy, best_student.test_accuracy)

    def runs_view(self) -> str:
        """Where the MLflow UI shows this search's trials as a training comparison (a path under the
        UI's address): the shared view of ``share_trials_view``."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        key = share_trials_view(self.client, experiment_id, self.run_id, self.knobs)
        return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"

    def end(self, error: BaseException | None = None) -> None:
        """End the parent run, and any child run still RUNNING (KILLED): nothing stays RUNNING."""
        end_trial_runs(self.client, self.run_id, {})
        status = run_status_for(error) if error is not None else KILLED if self.interrupted else FINISHED
        self.client.set_terminated(self.run_id, status)


@contextmanager
def tracked_search(tracking_uri: str, search_id: str, params: dict[str, Any], *, resume: bool, run_name: str,
                   tags: dict[str, str]) -> Iterator[SearchTracker]:
    """A SearchTracker whose runs end FINISHED, KILLED (interrupted) or FAILED as the block exits."""
    tracker = SearchTracker(tracking_uri, search_id, params, resume=resume, run_name=run_name, tags=tags)
    with ending_with_block(tracker.end):
        yield tracker


def open_search_run(client: MlflowClient, search_id: str, params: dict[str, Any], *, resume: bool = False,
                    run_name: str | None = None, experiment: str = SEARCH_EXPERIMENT) -> str:
    """The parent run of a search: a new one, or with ``resume`` the one of the same ``search_id``.

    ``search_id`` names the search uniquely (its experiment path): two searches may share a name.
    """
    experiment_id = ensure_experiment(client, experiment)
    tags = {TAG_KIND: "search", TAG_SEARCH: search_id}
    run_id = (open_run if resume else new_run)(client, experiment_id, tags, run_name or search_id)
    log_params(client, run_id, params)
    client.set_tag(run_id, NOTE, search_description(params))
    return run_id


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)

# The MLflow UI's "share view": an experiment tag of this prefix holds the runs table's state as
# JSON, and the URL's ?viewStateShareKey=KEY opens the table in that state (its Share button
# writes the same). Without it, the table opens on Created/Dataset/Duration/Source/Models columns,
# the trials folded under their parent and no metric in view.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
TRIALS_VIEW_METRICS = (BEST_VALIDATION_METRIC, TEST_METRIC, "val/best_epoch", "epoch")


def share_trials_view(client: MlflowClient, experiment_id: str, parent_run_id: str, knobs: list[str]) -> str:
    """Save the runs table of one search's trials as a shared view; returns its key.

    Only this search's child runs, best validation first, with the validation and test accuracy of
    the student each kept, its epoch, the epochs run, each searched knob and why the trial ended.
    """
    columns = ([f"metrics.`{name}`" for name in TRIALS_VIEW_METRICS] + [f"tags.`{TAG_STOP_REASON}`"]
               + [f"params.`{knob}`" for knob in knobs])
    state = {"searchFilter": f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
             "orderByKey": f"metrics.`{BEST_VALIDATION_METRIC}`", "orderByAsc": False,
             "selectedColumns": columns}
    key = "lrra-" + hashlib.sha256(parent_run_id.encode()).hexdigest()[:12]
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def searched_knobs(params: dict[str, Any]) -> list[str]:
    """The knobs a search searched, from its parent run's params (``space.NAME``: the knob's range)."""
    return [name.removeprefix("space.") for name in params if name.startswith("space.")]


def search_description(params: dict[str, Any]) -> str:
    """What was searched, on which teacher and data: the parent run's description."""
    knobs = searched_knobs(params)
    return (f"LRRA search of {len(knobs)} knob(s) ({', '.join(knobs)}) over {params.get('num_samples')} trial(s) "
            f"of {params.get('epochs')} epochs: preset {params.get('preset')}, dataset {params.get('dataset')}, "
            f"{params.get('teacher_arch')} teacher ({params.get('teacher.format', 'lrra')} file "
            f"{params.get('teacher.path') or 'trained here'}) to a "
            f"{params.get('student_arch')} student. Each trial is a child run named trial-NN · TUNE_ID (NN: the "
            "Optuna trial number). Trials are compared on validation accuracy; test accuracy only reports.")


# The parent run's metrics: the search's result at a glance (the runs table shows them as columns).
SUMMARY_REASONS = {"completed": "search/trials_completed", "early-stopped": "search/trials_early_stopped",
                   "time budget": "search/trials_cut_by_budget", "diverged": "search/trials_diverged",
                   "error": "search/trials_failed"}


def log_search_summary(client: MlflowClient, run_id: str, stop_reasons: list[str]) -> dict[str, float]:
    """Trial counts by how they ended, and the champion's validation and test accuracy, on the parent
    run; its description gains which trial won and by how much. Returns the metrics logged."""
    metrics = {key: float(stop_reasons.count(reason)) for reason, key in SUMMARY_REASONS.items()}
    logged = [(run.data.metrics[BEST_VALIDATION_METRIC], run.info.run_name, run.data.metrics.get(TEST_METRIC))
              for run in child_runs(client, run_id) if BEST_VALIDATION_METRIC in run.data.metrics]
    lines = []
    if logged:
        ranked = sorted(logged, key=lambda entry: entry[0], reverse=True)
        best_val, best_name, best_test = ranked[0]
        metrics["search/best_val_acc"] = best_val
        if best_test is not None:
            metrics["search/best_test_acc"] = best_test
        margin = f", {100 * (best_val - ranked[1][0]):.2f} points over {ranked[1][1]}" if len(ranked) > 1 else ""
        test = f", test {best_test:.4f}" if best_test is not None else ""
        lines.append(f"\n\n**Champion: {best_name}**, validation {best_val:.4f}{test}{margin}.")
        client.set_tag(run_id, TAG_BEST_TRIAL, best_name)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    note = client.get_run(run_id).data.tags.get(NOTE, "").split("\n\n**Champion")[0]
    client.set_tag(run_id, NOTE, note + "".join(lines))
    return metrics


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    filter_string = tag_filter({MLFLOW_PARENT_RUN_ID: parent_run_id})
    return list(client.search_runs([experiment_id], filter_string, max_results=SEARCH_MAX_RESULTS))


def end_trial_runs(client: MlflowClient, parent_run_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
    """Tag each child run with why its trial ended, and end it with the status that says so.

    ``outcomes``: Tune trial id -> (run status, stop reason). The search's outcome decides: a trial
    that a scheduler, the time budget or Ctrl-C stopped had its worker killed before it could end
    its own run, or (trained in the trial's own process) ended it as if it had finished; a diverged
    trial may have ended its run cleanly. A run whose trial is missing from ``outcomes`` keeps the
    status it ended with, or ends KILLED if still RUNNING.
    """
    for run in child_runs(client, parent_run_id):
        status, reason = outcomes.get(run.data.tags.get(TAG_TRIAL_ID), (KILLED, None))
        if reason is not None:
            client.set_tag(run.info.run_id, TAG_STOP_REASON, reason)
            client.set_tag(run.info.run_id, NOTE, trial_description(run.data.metrics, reason))
        if run.info.status != status and (reason is not None or run.info.status == RUNNING):
            client.set_terminated(run.info.run_id, status)


def trial_description(metrics: dict[str, float], reason: str) -> str:
    """A trial run's description: how it ended, and the student it kept (what the champion is chosen from)."""
    text = f"Ended: {reason}, after {int(metrics.get('epoch', 0))} epoch(s)."
    if BEST_VALIDATION_METRIC in metrics:
        text += (f" Kept student: epoch {int(metrics.get('val/best_epoch', 0))}, validation accuracy "
                 f"{metrics[BEST_VALIDATION_METRIC]:.4f}")
        text += f", test accuracy {metrics[TEST_METRIC]:.4f}." if TEST_METRIC in metrics else " (not scored on test)."
    return text


# ----------------------------------------------------------------------------------------
# The search's best student


class LoggedStudent(NamedTuple):
    """A trial's kept student as its MLflow run holds it."""

    model_uri: str
    val_accuracy: float
    test_accuracy: float | None
    trial_id: str | None  # Tune's trial id (TAG_TRIAL_ID)


def best_logged_student(client: MlflowClient, parent_run_id: str) -> LoggedStudent | None:
    """The search's best logged student, chosen by validation accuracy among every trial's kept
    student (completed, cut by the time budget, diverged); None if no trial logged one."""
    logged = [LoggedStudent(run.data.tags[TAG_MODEL_URI], run.data.metrics[BEST_VALIDATION_METRIC],
                            run.data.metrics.get(TEST_METRIC), run.data.tags.get(TAG_TRIAL_ID))
              for run in child_runs(client, parent_run_id)
              if TAG_MODEL_URI in run.data.tags and BEST_VALIDATION_METRIC in run.data.metrics]
    return max(logged, key=lambda student: student.val_accuracy, default=None)


# ----------------------------------------------------------------------------------------
# Search-level pictures and table (on the parent run)


def log_search_plots(client: MlflowClient, run_id: str, study) -> list[str]:
    """Optuna's interactive (Plotly) views of the study as HTML artifacts, which MLflow's UI shows
    in place: every trial's validation curve (the ones ASHA stopped included), the optimisation
    history, parallel coordinates (hover a line for its trial) and parameter importances.

    Importances need two or more complete trials whose parameters vary; the curves need a trial
    that reported an epoch; the others need one complete trial. Returns the artifact paths written.
    """
    from optuna.trial import TrialState
    from optuna.visualization import (
        plot_intermediate_values,
        plot_optimization_history,
        plot_parallel_coordinate,
        plot_param_importances,
    )

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {}
    if any(trial.intermediate_values for trial in study.get_trials(deepcopy=False)):
        plots["plots/validation_per_epoch.html"] = plot_intermediate_values
    if complete:
        plots["plots/optimization_history.html"] = plot_optimization_history
        plots["plots/parallel_coordinate.html"] = plot_parallel_coordinate
    if len(complete) >= 2 and _params_vary(complete):
        plots["plots/param_importances.html"] = plot_param_importances
    for artifact_file, plot in plots.items():
        client.log_figure(run_id, plot(study), artifact_file)
    return list(plots)


def _params_vary(trials) -> bool:
    return any(len({json.dumps(t.params.get(name), default=str) for t in trials}) > 1
               for name in trials[0].params)


def log_results_table(client: MlflowClient, run_id: str, frame, artifact_file: str = "results/trials.parquet") -> None:
    """A pandas DataFrame as a Parquet artifact of the run."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        frame.to_parquet(path)
        client.log_artifact(run_id, str(path), str(Path(artifact_file).parent))
