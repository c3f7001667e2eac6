"""Which Ray cluster a search runs on, and the LRRA settings that cluster provides.

``python tune/search.py`` picks its Ray with the first rule that applies:

1. ``--address HOST:PORT`` (or ``auto``): that cluster.
2. ``RAY_ADDRESS`` set: that cluster (Ray's own convention; ``ray job submit`` sets it too).
3. A cluster started on this node with ``ray start`` (``ray up`` does so on the head): Ray
   writes its address to ``<Ray temp dir>/ray_current_cluster``. It is joined if something
   answers there: a crashed cluster leaves the file behind, and the search then runs locally.
4. Otherwise a private local Ray, ``ray.init(address="local")``, exactly as without a cluster.

On a cluster (rules 1-3), the settings that cluster.yaml's head commands wrote (tune/head.py)
are the defaults of --preset, --storage-path, --tracking-uri and --study-storage. Flags win.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lrra import logs
from lrra.config import ConfigError
from lrra.library_hooks import ray_address_file, use_ray_token_if_available
from lrra.preflight import connect_error

SETTINGS_ENV = "LRRA_CLUSTER_SETTINGS"       # another settings file than the default one
DEFAULT_SETTINGS_FILE = "~/.lrra/cluster.json"
# Setting -> the flag it is the default of. "mlflow" is the head's own section (tune/head.py).
SETTING_FLAGS = {"preset": "--preset", "storage_path": "--storage-path", "tracking_uri": "--tracking-uri",
                 "study_storage": "--study-storage"}
# Not a flag's default: the autoscaler's config on the head (how far the cluster can grow).
AUTOSCALING_KEY = "autoscaling_config"
HEAD_ONLY_KEYS = {"mlflow", AUTOSCALING_KEY}
# Settings a resumed search ignores: it keeps what it started with (tune/search.py resumed_plan).
SHAPING = {"preset", "study_storage"}
CONNECT_TIMEOUT_S = 2.0
_UNSET = object()


@dataclass(frozen=True)
class Capacity:
    """How far an autoscaling cluster can grow, from its autoscaler config (node types' declared resources)."""

    node_types: dict[str, dict[str, float]]  # what one node of each type offers
    total: dict[str, float]                  # every type at its max_workers (the head once)


@dataclass(frozen=True)
class RayTarget:
    address: str | None  # None: start a private local Ray
    source: str          # "--address", "RAY_ADDRESS", the ray_current_cluster file, or "local"
    capacity: Capacity | None = None  # set on an autoscaling cluster whose settings name its config

    @property
    def is_cluster(self) -> bool:
        return self.address is not None


def answers(address: str) -> bool:
    """Whether a TCP server listens at the address (Ray's GCS port). Forms Ray resolves itself count as yes."""
    return connect_error(address, timeout=CONNECT_TIMEOUT_S) is None


def choose_ray(flag_address: str | None, environ: Mapping[str, str] = os.environ, temp_dir: str | None = None,
               alive: Callable[[str], bool] = answers) -> RayTarget:
    """The Ray this search uses, by the rules of the module docstring. Nothing is started here."""
    if flag_address:
        return RayTarget(flag_address, "--address")
    env_address = environ.get("RAY_ADDRESS", "").strip()
    if env_address == "local":
        return RayTarget(None, "local")
    if env_address:
        return RayTarget(env_address, "RAY_ADDRESS")
    address_file = ray_address_file(temp_dir)
    if address_file.is_file():
        recorded = address_file.read_text().strip()
        if recorded and alive(recorded):
            return RayTarget(recorded, str(address_file))
    return RayTarget(None, "local")


def settings_path(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(SETTINGS_ENV) or DEFAULT_SETTINGS_FILE).expanduser()


def read_settings(path: Path) -> dict[str, str]:
    """The cluster's LRRA settings ({} when the file does not exist); a bad file is a ConfigError."""
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cluster settings {path}: not readable as JSON ({err}); fix it, or remove it "
                          "(it is written by cluster.yaml's head commands, `python tune/head.py settings`)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"cluster settings {path}: expected a JSON object, got {type(values).__name__}")
    unknown = set(values) - set(SETTING_FLAGS) - HEAD_ONLY_KEYS
    if unknown:
        raise ConfigError(f"cluster settings {path}: unknown key(s) {sorted(unknown)}; "
                          f"allowed: {sorted(SETTING_FLAGS) + sorted(HEAD_ONLY_KEYS)}")
    for key in [*SETTING_FLAGS, AUTOSCALING_KEY]:
        if key in values and not (isinstance(values[key], str) and values[key]):
            raise ConfigError(f"cluster settings {path}: '{key}' must be a non-empty string, got {values[key]!r}")
    return {key: values[key] for key in [*SETTING_FLAGS, AUTOSCALING_KEY] if key in values}


def given_options(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> set[str]:
    """The settings' options that the command line gives explicitly (even when equal to the default)."""
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(SETTING_FLAGS, _UNSET))
    parsed = vars(parser.parse_args(argv))
    return {key for key in SETTING_FLAGS if parsed.get(key, _UNSET) is not _UNSET}


def apply_settings(args: argparse.Namespace, settings: dict[str, str], given: set[str],
                   environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Fill the options the command line left out from the cluster's settings; returns what was used.

    Not applied: the preset to --smoke-test (a fixed small search) and to --resume, nor the
    study storage to --resume (a resumed search keeps what it started with); the tracking URI
    when $MLFLOW_TRACKING_URI is set (the user's own choice, as without a cluster).
    """
    skip = set(given)
    if args.resume is not None:
        skip |= SHAPING
    if args.smoke_test:
        skip.add("preset")
    if environ.get("MLFLOW_TRACKING_URI"):
        skip.add("tracking_uri")
    used = {key: value for key, value in settings.items() if key in SETTING_FLAGS and key not in skip}
    for key, value in used.items():
        setattr(args, key, value)
    return used


def describe(target: RayTarget, nodes: list[dict], resources: dict[str, float]) -> str:
    """The line the search prints once joined: which Ray, and what it holds."""
    alive = [node for node in nodes if node.get("Alive")]
    found = (f"{len(alive)} node(s), {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s): "
             + ", ".join(sorted(node["NodeManagerAddress"] for node in alive)))
    if not target.is_cluster:
        return f"ray: a private local Ray (no cluster running here, RAY_ADDRESS unset) with {found}"
    return f"ray: joined the cluster at {target.address} (found via {target.source}) with {found}"


def prepare(args: argparse.Namespace, argv: list[str] | None,
            build_parser: Callable[[], argparse.ArgumentParser]) -> RayTarget:
    """Choose the Ray (nothing started) and, on a cluster, fill the left-out options from its settings."""
    target = choose_ray(args.address)
    if target.source == "RAY_ADDRESS" and not answers(target.address):
        raise ConfigError(f"RAY_ADDRESS={target.address}: nothing answers there; start that cluster, "
                          "or unset RAY_ADDRESS to run on a private local Ray")
    if target.is_cluster:
        path = settings_path()
        settings = read_settings(path)
        used = apply_settings(args, settings, given_options(build_parser, argv))
        if used:
            logs.search.info(f"cluster settings from {path}: "
                             + ", ".join(f"{SETTING_FLAGS[key]} {value}" for key, value in used.items()))
        if AUTOSCALING_KEY in settings:
            target = RayTarget(target.address, target.source, read_capacity(Path(settings[AUTOSCALING_KEY])))
    if target.is_cluster and target.source not in ("--address", "RAY_ADDRESS"):
        # What ray.init(address="auto") does for a cluster it finds on this node: use the node's Ray
        # token if there is one. An address given explicitly never gets the token unasked (Ray's
        # rule: it could be anyone's server); RAY_AUTH_MODE=token asks for it.
        use_ray_token_if_available()
    return target


def join_failure(target: RayTarget, error: Exception) -> str:
    """Why the search could not join ``target``, and what to check (Ray retries for a while, then says little)."""
    hint = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
            "; if the cluster uses Ray's token authentication, set RAY_AUTH_MODE=token and give this node its "
            "token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    return f"{target.source} {target.address}: cannot join that Ray cluster ({error}){hint}"


# A custom resource that only the head advertises (cluster.yaml, or `ray start --head --resources`):
# when the cluster has it, every trial's own process (Tune function + Ray Train controller) needs one
# unit, so trial drivers stay on the head and never on a worker node the autoscaler may remove.
DRIVER_RESOURCE = "lrra_driver"


def driver_resources(cluster_resources: Mapping[str, float]) -> dict[str, float]:
    return {DRIVER_RESOURCE: 1.0} if cluster_resources.get(DRIVER_RESOURCE, 0) >= 1 else {}


def read_capacity(path: Path) -> Capacity:
    """The node types and the largest cluster that an autoscaler config (cluster.yaml's form) allows."""
    import yaml

    try:
        config = yaml.safe_load(path.expanduser().read_text())
        types, head = config["available_node_types"], config["head_node_type"]
        node_types = {name: dict(spec["resources"]) for name, spec in types.items()}
        counts = {name: 1 if name == head else int(spec.get("max_workers", 0)) for name, spec in types.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cluster settings: autoscaling_config {path} cannot be read as a Ray cluster config "
                          f"with available_node_types, head_node_type and each type's resources ({err!r})") from None
    total: dict[str, float] = {}
    for name, offer in node_types.items():
        for key, value in offer.items():
            total[key] = total.get(key, 0) + value * counts[name]
    return Capacity(node_types, total)


def fit_to_capacity(plan, capacity: Capacity, worker: dict[str, float]):
    """fit_resources for an autoscaling cluster: sized to what it can grow to, not to what runs now.

    Trials beyond the nodes running now wait PENDING, and their demand is what makes the
    autoscaler add nodes. ``worker`` is one Ray Train worker's resources (GPU default resolved).
    """
    from lrra.preflight import DistributedSetupError

    if not any(all(offer.get(k, 0) >= v for k, v in worker.items()) for offer in capacity.node_types.values()):
        raise DistributedSetupError(f"--workers-per-trial {plan.workers_per_trial}: one worker needs {worker} but "
                                    f"no node type of the cluster offers that ({capacity.node_types})")
    need = {k: v for k, v in plan.trial_resources().items() if v > 0} | driver_resources(capacity.total)
    plan.max_concurrent_trials = min(int(capacity.total.get(k, 0) // v) for k, v in need.items())
    if plan.max_concurrent_trials < 1:
        raise DistributedSetupError(f"one trial needs {need} but the cluster grows to at most {capacity.total}; "
                                    "lower --workers-per-trial/--driver-cpus or raise the node types' max_workers")
    return plan


# On a cluster, a worker node can go away under a trial (the autoscaler, a spot reclaim, a crash):
# Ray Train then restarts the trial's worker group from its last checkpoint, on whatever node has
# room, this many times. A private local Ray has no node to lose; a failure there is a bug, shown at once.
CLUSTER_TRIAL_MAX_FAILURES = 2


def trial_max_failures(target: RayTarget) -> int:
    return CLUSTER_TRIAL_MAX_FAILURES if target.is_cluster else 0
