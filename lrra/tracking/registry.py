"""The model registry: each registered student is a version; the alias ``champion`` names the best.

One registered model per thing distilled (registered_model_name). Every version records the
validation accuracy that chose it (tag ``val_accuracy``) and, for the reader, its test accuracy
(tag ``test_accuracy``, never compared); the champion is the version with the highest
validation accuracy, the earliest registered among equals, so a tie keeps the older champion.

Several searches may register into one registry at once. Reading the champion's accuracy,
comparing and then setting the alias would let a slower registration overwrite a better
champion it never saw. Instead every registration, after adding its version, settles the alias
(settle_champion): it reads the alias and all versions, points the alias at the best, and reads
again until alias and best agree. Why the alias ends on a best version once registrations stop:
versions are only added, each created with its accuracy tag in the same request, so any read
after the best version's registration sees it. That registration returns only after a read
that found the alias on a best version. Any later write is followed by its writer's own read,
which sees the best version too, so the last writer stops only with the alias on a best one.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lrra.config import LRRAConfig
from lrra.tracking.store import TrackingError

CHAMPION_ALIAS = "champion"
VERSION_ACCURACY_TAG = "val_accuracy"            # on a registered version: what picks the champion
VERSION_TEST_TAG = "test_accuracy"               # reported only
SETTLE_ROUNDS = 100                              # each round means another registration moved the alias


def registered_model_name(cfg: LRRAConfig) -> str:
    """``lrra-<what>-student``, named after what ``cfg`` distils (``LRRAConfig.subject``): the mnist
    preset run with dataset=FashionMNIST registers lrra-fashionmnist-student, not lrra-mnist-student."""
    return f"lrra-{cfg.subject}-student"


def register_champion(client: MlflowClient, name: str, model_uri: str, val_accuracy: float,
                      test_accuracy: float | None = None) -> dict[str, Any]:
    """Register ``model_uri`` as a version of registered model ``name``; the alias then names the best version.

    ``name`` comes from registered_model_name. The validation accuracy is recorded on the version
    (tag ``val_accuracy``) as the version is created, so concurrent registrations see it; the test
    accuracy, when known, rides along for the reader. Returns the version, whether it holds the
    alias once settled, and the champion's validation accuracy before.
    """
    previous = champion_accuracy(client, name)
    tags = {VERSION_ACCURACY_TAG: repr(float(val_accuracy))}
    if test_accuracy is not None:
        tags[VERSION_TEST_TAG] = repr(float(test_accuracy))
    # mlflow.register_model (on the URI connect() set) also links the version to its logged model.
    model_version = mlflow.register_model(model_uri, name, tags=tags)
    test = f", test accuracy {test_accuracy:.4f}" if test_accuracy is not None else ""
    client.update_model_version(name, model_version.version, description=(
        f"Student distilled by LRRA: validation accuracy {val_accuracy:.4f}{test} (validation chose it; "
        f"test only reports). Logged model {model_uri}."))
    client.update_registered_model(name, description=(
        f"Students distilled by LRRA (data-free). The alias '{CHAMPION_ALIAS}' names the version with the "
        f"highest validation accuracy; load it with mlflow.pytorch.load_model('models:/{name}@{CHAMPION_ALIAS}') "
        "or export it with python -m lrra export."))
    champion = settle_champion(client, name)
    return {"name": name, "version": int(model_version.version), "champion": champion == int(model_version.version),
            "previous_champion_accuracy": previous}


def settle_champion(client: MlflowClient, name: str) -> int:
    """Point ``champion`` at the best version of ``name`` until a fresh read agrees; returns that version."""
    for _ in range(SETTLE_ROUNDS):
        current = champion_version(client, name)
        best = best_version(client, name, current)
        if best is None or best == current:
            return current
        try:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, str(best))
        except MlflowException:
            # Two registrations creating the alias at once: the store inserts it for both and the
            # second insert breaks its uniqueness (seen with SQLite). The other one has set it then,
            # and the next round reads what it set. Any other failure is real.
            if current is not None or champion_version(client, name) is None:
                raise
    raise TrackingError(f"registered model {name}: the {CHAMPION_ALIAS} alias kept moving for {SETTLE_ROUNDS} "
                        "rounds; are registrations still arriving? It settles at the next registration")


def best_version(client: MlflowClient, name: str, current: int | None = None) -> int | None:
    """The version with the highest recorded accuracy; among equals ``current``, else the earliest."""
    scored = [(accuracy, version == current, -version) for version, accuracy in version_accuracies(client, name)]
    return -max(scored)[2] if scored else None


def version_accuracies(client: MlflowClient, name: str) -> list[tuple[int, float]]:
    """(version, recorded accuracy) of every version of ``name``; versions registered without one are skipped."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        found += [(int(v.version), float(v.tags[VERSION_ACCURACY_TAG]))
                  for v in page if VERSION_ACCURACY_TAG in v.tags]
        token = page.token
        if not token:
            return found


def champion_version(client: MlflowClient, name: str) -> int | None:
    champion = _champion(client, name)
    return int(champion.version) if champion is not None else None


def champion_accuracy(client: MlflowClient, name: str) -> float | None:
    """The test accuracy recorded on the version the champion alias points to (None: no champion)."""
    champion = _champion(client, name)
    if champion is None or VERSION_ACCURACY_TAG not in champion.tags:
        return None
    return float(champion.tags[VERSION_ACCURACY_TAG])


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or no such alias
        return None
