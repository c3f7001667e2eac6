"""Checks that run before any Ray Train work, each failing in seconds with one clear line.

Used by ``distill --workers N`` and by the search: the number of workers, the storage path,
the cluster address and whether the cluster can place the workers; and starting (or joining)
Ray itself. Ray retries an unreachable head or an unplaceable worker group for minutes, so
every check here answers first.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray

from lrra.config import ConfigError, LRRAConfig
from lrra.fault_injection import ENV, Faults

DEFAULT_RESOURCES_PER_WORKER = {"CPU": 1}
ADDRESS_TIMEOUT_S = 5.0


class DistributedSetupError(ConfigError):
    """A distributed-run option (--workers, --storage, ...) cannot work; the message names it."""


def check_workers(workers: int) -> None:
    if workers < 1:
        raise DistributedSetupError(f"--workers {workers}: Ray Train needs at least 1 worker "
                                    "(--workers 0 runs in this process without Ray)")


def check_fault_switch(cfg: LRRAConfig) -> Faults:
    """The test-only faults of this process's environment (lrra/fault_injection.py), checked.

    The fault fires only in a group that did not resume; with no checkpoint before the fault
    epoch every restarted group would start fresh and fail again.
    """
    faults = Faults.from_environment()
    if faults.fault_at_epoch >= 0 and not (1 <= cfg.checkpoint_every <= faults.fault_at_epoch):
        raise ConfigError(f"{ENV}: fault_at_epoch={faults.fault_at_epoch} needs a checkpoint before it under "
                          f"Ray Train, i.e. fault_at_epoch >= checkpoint_every >= 1 "
                          f"(checkpoint_every = {cfg.checkpoint_every})")
    return faults


def check_storage(storage: str) -> str:
    """The storage path as Ray Train wants it (absolute, or a URI); fails if it cannot be written.

    A local path is probed without leaving anything behind: its nearest existing ancestor must
    be a folder that takes a (self-deleting) file. A URI is opened with pyarrow and written to.
    """
    if "://" in storage:
        return _check_storage_uri(storage)
    path = Path(storage).expanduser().absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise DistributedSetupError(f"--storage {storage}: {ancestor} is a file, so no folder can be made there")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise DistributedSetupError(f"--storage {storage}: cannot write in {ancestor} ({err.strerror})") from None
    return str(path)


def _check_storage_uri(uri: str) -> str:
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.lrra-write-probe-{os.getpid()}"
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except Exception as err:  # noqa: BLE001 - pyarrow raises OSError, ValueError or ArrowException
        raise DistributedSetupError(f"--storage {uri}: cannot write there ({err})") from None
    return uri


def connect_error(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> OSError | None:
    """Why nothing listens at a Ray address's HOST:PORT (its GCS port), or None when something does.
    Forms that Ray resolves itself ("auto", no port) are not probed: None."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        return err
    return None


def check_address(address: str) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connect says so in seconds."""
    if (err := connect_error(address)) is not None:
        raise DistributedSetupError(f"--address {address}: nothing answers there ({err})")


def start_ray(address: str | None, **init_options: Any) -> None:
    """Join ``address``, or start a private local Ray: "local" starts one even when another runs here.

    Ray's own output is kept to warnings and errors (``logging_level``, unless the caller says
    otherwise), without colour codes when stderr is not a terminal (a log file, CI). A private
    local Ray runs no preemption watcher: nothing can preempt it, and the watcher's actor logs an
    error line at every start.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by the driver when it prints worker lines
    if address is None:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # inherited by the local Ray
    init_options.setdefault("logging_level", "WARNING")
    try:
        ray.init(address=address or "local", **init_options)
    except ConnectionError as err:
        raise DistributedSetupError(f"--address {address}: cannot join that Ray cluster ({err})") from None


def worker_resources(use_gpu: bool = False, resources_per_worker: dict[str, float] | None = None) -> dict[str, float]:
    """What one worker reserves: {"CPU": 1} by default, plus one GPU with use_gpu."""
    resources = dict(resources_per_worker or DEFAULT_RESOURCES_PER_WORKER)
    if use_gpu:
        resources.setdefault("GPU", 1)
    return resources


def check_cluster_fits(workers: int, resources: dict[str, float]) -> None:
    """Fail now, instead of Ray Train waiting forever, when the cluster cannot place the workers.

    Compares with the cluster's total resources (other jobs only delay a run); an autoscaling
    cluster that would grow on demand is not foreseen here.
    """
    needed = {k: v * workers for k, v in resources.items()}
    have = ray.cluster_resources()
    fits_a_node = any(all(node["Resources"].get(k, 0) >= v for k, v in resources.items())
                      for node in ray.nodes() if node["Alive"])
    if fits_a_node and all(have.get(k, 0) >= v for k, v in needed.items()):
        return
    has = "{" + ", ".join(f"'{k}': {have.get(k, 0):g}" for k in needed) + "}"
    raise DistributedSetupError(
        f"--workers {workers} asks for {resources} per worker, {needed} in all, but the Ray cluster has {has}"
        + ("" if fits_a_node else " and no node fits one worker")
        + "; use fewer workers or a bigger cluster (--address)")
