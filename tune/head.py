"""What cluster.yaml's head commands run on the head node: ``python tune/head.py settings|mlflow``.

``settings --storage-path URI [--preset P]`` writes the cluster's LRRA settings (~/.lrra/cluster.json,
or $LRRA_CLUSTER_SETTINGS) that ``python tune/search.py`` reads on this cluster (tune/cluster.py):
the shared storage, the MLflow tracking server on the head's private address, and the Optuna study
in SQLite on the head's disk. ``mlflow`` (re)starts that tracking server in the background: its
store is SQLite on the head's disk, its artifacts go to the shared storage, and it listens on the
private address only (nodes reach it inside the cluster's network; people through an SSH forward).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from lrra import logs
from lrra.presets import PRESETS
from tune.cluster import settings_path

MLFLOW_PORT = 5000
ARTIFACTS_FOLDER = "mlflow-artifacts"
HEALTH_TIMEOUT_S = 120.0


def private_address() -> str:
    """This node's address as Ray sees it (the interface of the default route; nothing is sent)."""
    import ray.util

    return ray.util.get_node_ip_address()


def head_settings(storage_path: str, preset: str | None, host: str, port: int, state_dir: Path,
                  autoscaling_config: str | None = None) -> dict:
    settings = {
        "storage_path": storage_path.rstrip("/"),
        "tracking_uri": f"http://{host}:{port}",
        "study_storage": f"sqlite:///{state_dir / 'optuna.db'}",
        "mlflow": {"host": host, "port": port, "backend_store_uri": f"sqlite:///{state_dir / 'mlflow.db'}",
                   "artifacts_destination": f"{storage_path.rstrip('/')}/{ARTIFACTS_FOLDER}"},
    }
    if preset:
        settings["preset"] = preset
    if autoscaling_config:
        settings["autoscaling_config"] = str(Path(autoscaling_config).expanduser().absolute())
    return settings


def write_settings(args: argparse.Namespace) -> Path:
    path = settings_path()
    state_dir = path.parent.absolute()
    settings = head_settings(args.storage_path, args.preset, args.host or private_address(), args.port, state_dir,
                             args.autoscaling_config)
    state_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(settings, indent=2) + "\n")
    partial.replace(path)  # a search starting now reads the old file or the new one, never half of one
    logs.search.info(f"wrote {path}: {json.dumps(settings)}")
    return path


def healthy(uri: str) -> bool:
    # Here, not at the top: it imports torch and MLflow (~2 s), which `settings` does not need.
    from lrra.tracking.store import TrackingError, check_server

    try:
        check_server(uri)  # the check a search makes of its --tracking-uri
    except TrackingError:
        return False
    return True


def stop_previous(pid_file: Path) -> None:
    """Stop the server this script started last time (`ray up` runs the head commands again)."""
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass  # no file, or that server is gone already


def without_mlflow_jobs(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: MLflow's job runner off unless the user set it. The runner serves
    MLflow's GenAI jobs (scorers, prompt optimisation), which LRRA never submits, and starts seven
    consumer processes with the server: ~7 CPU-seconds of a 2-core head's start, and their memory."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **environ}


def start_mlflow(_: argparse.Namespace) -> None:
    path = settings_path()
    server = json.loads(path.read_text())["mlflow"]
    uri = f"http://{server['host']}:{server['port']}"
    pid_file, log_file = path.parent / "mlflow.pid", path.parent / "mlflow.log"
    stop_previous(pid_file)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", server["backend_store_uri"],
               "--artifacts-destination", server["artifacts_destination"],
               "--host", server["host"], "--port", str(server["port"])]
    with open(log_file, "ab") as log:
        # Its own session: it outlives this command and the SSH session that ran it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=without_mlflow_jobs(os.environ))
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while not healthy(uri):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"mlflow server did not come up at {uri}; see {log_file}")
        time.sleep(1)
    logs.search.info(f"mlflow server at {uri} (pid {process.pid}, log {log_file})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tune/head.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    settings = commands.add_parser("settings", help="write the cluster's LRRA settings")
    settings.add_argument("--storage-path", required=True,
                          help="shared storage every node reaches, e.g. s3://bucket/lrra (checkpoints, Tune "
                               "state, MLflow artifacts)")
    settings.add_argument("--preset", choices=sorted(PRESETS), help="the search's default preset on this cluster")
    settings.add_argument("--host", help="address the MLflow server listens on (default: this node's private one)")
    settings.add_argument("--autoscaling-config", metavar="YAML",
                          help="the autoscaler's config (`ray up` leaves it at ~/ray_bootstrap_config.yaml): the "
                               "search sizes itself to what the cluster can grow to, not to the nodes running now")
    settings.add_argument("--port", type=int, default=MLFLOW_PORT, help=f"MLflow port (default: {MLFLOW_PORT})")
    settings.set_defaults(run=write_settings)
    commands.add_parser("mlflow", help="(re)start the MLflow tracking server").set_defaults(run=start_mlflow)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
