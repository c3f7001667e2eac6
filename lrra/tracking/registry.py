"""The model registry: each registered student is a version; the alias ``champion`` names the best."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION_ALIAS = "champion"
VERSION_ACCURACY_TAG = "test_accuracy"           # on a registered version: what the alias compares


def registered_model_name(preset: str) -> str:
    return f"lrra-{preset}-student"


def champion_accuracy(client: MlflowClient, name: str) -> float | None:
    """The test accuracy recorded on the version the champion alias points to (None: no champion)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or no such alias
        return None
    return float(champion.tags[VERSION_ACCURACY_TAG])


def register_champion(client: MlflowClient, preset: str, model_uri: str, test_accuracy: float) -> dict[str, Any]:
    """Register ``model_uri`` as a version of lrra-<preset>-student; move ``champion`` only if it beats it.

    The accuracy is recorded on the version (tag ``test_accuracy``) so later calls compare with it.
    """
    name = registered_model_name(preset)
    previous = champion_accuracy(client, name)
    model_version = mlflow.register_model(model_uri, name, tags={VERSION_ACCURACY_TAG: repr(float(test_accuracy))})
    is_champion = previous is None or test_accuracy > previous
    if is_champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, model_version.version)
    return {"name": name, "version": int(model_version.version), "champion": is_champion,
            "previous_champion_accuracy": previous}
