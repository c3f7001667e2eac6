"""Real services the tests start on loopback: a free port, an `mlflow server`, a smoke search."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tune.head import without_mlflow_jobs

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """URI of a real `mlflow server` on a free loopback port, with proxied artifacts under ``folder``."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # the default 4 processes take a minute to start on two busy cores
    uri = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=without_mlflow_jobs(os.environ))
        try:
            wait_for_health(uri, server, timeout_s=120)
            yield uri
        finally:
            server.terminate()
            server.wait(timeout=30)


def wait_for_health(uri: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited during startup"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} did not answer /health within {timeout_s} s")


# The useless trial: a student that barely moves. The preset's own trial (the first) learns, so
# ASHA stops the useless one at its first rung (after epoch 1, grace period 1).
USELESS_TRIAL = ["--bound", "student_lr=1e-5:0.3", "--point", "student_lr=1e-5"]


def search_command(storage: Path, teacher: Path, *args: str) -> list[str]:
    """`tune/search.py --smoke-test` on the digits teacher, writing under ``storage``."""
    return [sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test", "--teacher", str(teacher),
            "--storage-path", str(storage), "--data-dir", str(storage / "data"), *args]
