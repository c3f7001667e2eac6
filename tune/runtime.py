"""What a search and a comparison share before their trials start: the flags that size a trial,
the Ray they run on, how many trials run at once and with how many CPUs, and quiet libraries."""

from __future__ import annotations

import argparse
import logging

import optuna
import ray

from lrra import logs
from lrra.config import ConfigError
from lrra.preflight import DistributedSetupError, check_cluster_fits, start_ray
from tune import cluster
from tune.plan import SearchPlan
from tune.trial import worker_resources

logger = logs.search


def add_resource_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags that size a trial and how many run at once: shared by the search and tune/compare.py."""
    group.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default: 1)")
    group.add_argument("--cpus-per-worker", type=float,
                       help="CPUs (and torch threads) per worker (default: on CPUs, the free CPUs shared out over "
                            "the trials that run at once, at least 1; with GPUs, 1)")
    group.add_argument("--gpus-per-worker", type=float,
                       help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)")
    group.add_argument("--max-concurrent-trials", type=int, metavar="N",
                       help="run at most N trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    group.add_argument("--driver-cpus", type=float, default=0.0,
                       help="CPUs reserved for each trial's own process, which only waits on its Ray Train run "
                            "(default: 0, so every CPU goes to the workers that train; a one-worker trial on a "
                            "local Ray trains in its own process, with its worker's CPUs)")


def check_resource_arguments(args: argparse.Namespace) -> None:
    for flag, value in (("--workers-per-trial", args.workers_per_trial),
                        ("--max-concurrent-trials", args.max_concurrent_trials)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    for flag, value in (("--cpus-per-worker", args.cpus_per_worker), ("--driver-cpus", args.driver_cpus),
                        ("--gpus-per-worker", args.gpus_per_worker)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} {value}: must be >= 0")


def start_search_ray(target: cluster.RayTarget) -> None:
    # Ray's dashboard stays on: Ray Train frees a stopped trial's workers through the state API it
    # serves. Workers' logs stay in Ray's session folder: the driver prints one line per trial event.
    try:
        start_ray(target.address, logging_level="WARNING", log_to_driver=False)
    except DistributedSetupError as err:
        raise DistributedSetupError(cluster.join_failure(target, err.__context__ or err)) from None
    logger.info(cluster.describe(target, ray.nodes(), ray.cluster_resources()))


def fit_resources(plan: SearchPlan, capacity: cluster.Capacity | None = None) -> SearchPlan:
    """Resolve the GPU default and derive how many trials run at once from the free resources
    (on an autoscaling cluster: from what it can grow to, tune/cluster.py)."""
    if plan.gpus_per_worker is None:
        gpus = (capacity.total if capacity else ray.cluster_resources()).get("GPU", 0)
        plan.gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if plan.cpus_per_worker is None:
        sized_here = capacity is None and plan.gpus_per_worker == 0  # else a CPU per worker, Ray not asked
        free_cpus = ray.available_resources().get("CPU", 0) if sized_here else None
        largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]),
                           default=0) if sized_here else 0
        plan.cpus_per_worker = share_cpus(free_cpus, plan.workers_per_trial, plan.most_at_once, largest_node)
    if capacity is not None:
        cluster.fit_to_capacity(plan, capacity, worker_resources(plan.cpus_per_worker, plan.gpus_per_worker))
    else:
        check_cluster_fits(plan.workers_per_trial, worker_resources(plan.cpus_per_worker, plan.gpus_per_worker))
        free = ray.available_resources()
        need = {k: v for k, v in plan.trial_resources().items() if v > 0} | cluster.driver_resources(free)
        plan.max_concurrent_trials = min(int(free.get(k, 0) // v) for k, v in need.items())
        if plan.max_concurrent_trials < 1:
            have = {k: free.get(k, 0) for k in need}
            raise DistributedSetupError(f"one trial needs {need} (its driver plus {plan.workers_per_trial} worker(s)) "
                                        f"but the cluster has {have} free; lower --workers-per-trial/--driver-cpus")
    plan.max_concurrent_trials = min(plan.max_concurrent_trials, plan.most_at_once)
    return plan


def share_cpus(free_cpus: float | None, workers_per_trial: int, trials: int, largest_node: float = 0) -> float:
    """CPUs per worker that keep every free CPU busy: as many trials at once as there are trials
    and CPUs for one worker each, then the CPUs left over shared out among their workers.

    2 CPUs and 8 trials: 2 trials at a time, 1 CPU (one torch thread) each. 16 CPUs and 8 trials:
    8 trials, 2 each. A worker's CPUs are one node's, so never more than ``largest_node`` offers
    (when known): two 1-CPU nodes and one trial give 1. With GPUs (``free_cpus`` None) a worker's
    CPU only feeds its GPU: 1.
    """
    if not free_cpus:
        return 1.0
    at_once = max(1, min(trials, int(free_cpus // workers_per_trial)))
    share = max(1, int(free_cpus // (at_once * workers_per_trial)))
    return float(min(share, max(1, int(largest_node))) if largest_node else share)


def cluster_tags() -> dict[str, str]:
    """The Ray cluster this (part of the) search ran on; tags, since a resumed search may run elsewhere."""
    resources = ray.cluster_resources()
    return {"lrra.cluster.nodes": str(len([n for n in ray.nodes() if n["Alive"]])),
            "lrra.cluster.cpus": f"{resources.get('CPU', 0):g}", "lrra.cluster.gpus": f"{resources.get('GPU', 0):g}"}


def quiet_libraries() -> None:
    """Optuna's and MLflow's INFO lines (a study created, tables set up) say nothing the progress
    lines do not; their warnings and errors still show."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
