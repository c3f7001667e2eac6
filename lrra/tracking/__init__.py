"""MLflow tracking of LRRA runs: stores, runs, per-epoch logging, the student, the registry.

One short module per concern; this package re-exports what callers use, so ``from lrra import
tracking; tracking.connect(...)`` works:

- store.py    the tracking URI, a fast check that its store can be used, the client, experiments
- runs.py     a run's lifecycle: tags, opening or finding a run again, ending it, a failure reason
- targets.py  which run a training process logs to, and contexts that end it with their block
- epochs.py   RunTracker: per-epoch metrics, generated-image grids, system metrics
- student.py  the best student as an MLflow model, and `python -m lrra eval` on it
- registry.py registered model names and the race-safe ``champion`` alias

A search's own tracking (its parent run, plots, results table, registering its best student)
lives with the search, in tune/search_tracking.py. The LRRA core (config to train) never
imports MLflow; this package is imported only where something is tracked.
"""

from lrra.tracking.epochs import IMAGE_KEY, RunTracker, generated_image_grid, log_epoch_metrics
from lrra.tracking.registry import (
    CHAMPION_ALIAS,
    VERSION_ACCURACY_TAG,
    champion_accuracy,
    register_champion,
    registered_model_name,
    settle_champion,
)
from lrra.tracking.runs import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    TAG_FAILURE,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_OPTUNA_TRIAL,
    TAG_TRIAL_ID,
    end_run,
    ended_run,
    ending_with_block,
    log_params,
    new_run,
    open_distill_run,
    open_run,
    open_trial_run,
    run_status_for,
    tag_failure,
    tag_filter,
)
from lrra.tracking.store import (
    TrackingError,
    check_tracking_uri,
    connect,
    ensure_experiment,
    resolve_tracking_uri,
)
from lrra.tracking.student import evaluate_logged_student
from lrra.tracking.targets import RunTarget, distill_target, tracked_distill, tracked_run, tracked_worker

__all__ = [
    "CHAMPION_ALIAS", "FAILED", "FINISHED", "IMAGE_KEY", "KILLED", "RUNNING", "TAG_FAILURE", "TAG_KIND",
    "TAG_MODEL_URI", "TAG_OPTUNA_TRIAL", "TAG_TRIAL_ID", "VERSION_ACCURACY_TAG", "RunTarget", "RunTracker",
    "TrackingError", "champion_accuracy", "check_tracking_uri", "connect", "distill_target", "end_run", "ended_run",
    "ending_with_block", "ensure_experiment", "evaluate_logged_student", "generated_image_grid",
    "log_epoch_metrics", "log_params", "new_run", "open_distill_run", "open_run", "open_trial_run",
    "register_champion", "registered_model_name", "resolve_tracking_uri", "run_status_for", "settle_champion",
    "tag_failure", "tag_filter", "tracked_distill", "tracked_run", "tracked_worker",
]
