"""Where runs are stored: the tracking URI, a fast check that it can be used, and the client.

Stores: ``sqlite:///mlflow.db`` in the working directory by default (one machine), or a tracking
server (``http://HOST:PORT``) that every node of a cluster can reach. A server is probed with one
short HTTP request before anything starts: MLflow's own client retries for minutes.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lrra.config import ConfigError

SQLITE = "sqlite:///"
DEFAULT_TRACKING_URI = SQLITE + "mlflow.db"
SERVER_CHECK_TIMEOUT_S = 5.0
STORE_LOCK_TIMEOUT_S = 120.0  # MLflow's migrations of a new SQLite store take seconds
# Defaults for MLflow's HTTP client once the server answered: fail within a minute or so instead
# of retrying for minutes (7 retries with exponential backoff). A user's own setting wins.
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class TrackingError(ConfigError):
    """The tracking store or a logged model cannot be used; the message says which and how to fix it."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else ./mlflow.db; SQLite paths are made absolute.

    Absolute because Ray Train workers run in their own working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    database = sqlite_path(uri)
    return SQLITE + str(database.absolute()) if database is not None else uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI (None for any other store)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_uri(uri: str) -> None:
    """Raise TrackingError, within seconds, when the store at ``uri`` cannot be used."""
    database = sqlite_path(uri)
    if is_server(uri):
        check_server(uri)
    elif database is not None and not database.parent.is_dir():
        raise TrackingError(f"--tracking-uri {uri}: folder {database.parent} does not exist; "
                            "create it or pick another path")


def check_server(uri: str) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=SERVER_CHECK_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise TrackingError(f"--tracking-uri {uri}: {health} answered HTTP {err.code}; is that an MLflow "
                            "tracking server?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"--tracking-uri {uri}: no MLflow tracking server reachable there ({reason}). Start one with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host HOST --port PORT`, or leave out "
            f"--tracking-uri to log to {DEFAULT_TRACKING_URI} in this folder") from None


def connect(uri: str) -> MlflowClient:
    """Point this process's MLflow at ``uri`` (model logging and registration read it) and return a client."""
    if is_server(uri):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    database = sqlite_path(uri)
    if database is None:
        return MlflowClient(uri)
    # Opening a SQLite store runs MLflow's schema migrations when it is new. Two processes that
    # open the same new store at once (two `lrra distill` started together) both migrate, and one
    # fails ("duplicate column name"), so the opening is one process at a time. The lock file
    # stays beside the database (removing it would race with a process about to take it).
    with FileLock(store_lock_path(database), timeout=STORE_LOCK_TIMEOUT_S):
        return MlflowClient(uri)


def store_lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, wherever the process runs.

    Not in ./mlruns (MLflow's default): `mlflow server` run in a folder that holds ./mlruns takes
    it for a deprecated file store. A tracking server picks its own location (None).
    """
    database = sqlite_path(uri)
    return str(database.parent / "mlartifacts" / experiment) if database is not None else None


# MLflow 3 opens an experiment in the view its kind names; without the tag it guesses the GenAI
# overview (traces, latency, tokens). These experiments hold training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (artifacts as artifact_location says) if missing, and
    tagged as one of training runs (an older experiment of this project gets the tag too)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
        except MlflowException:
            # Another process created it between the lookup and here (the name is unique).
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    return experiment.experiment_id
