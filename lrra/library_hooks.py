"""The project's only reach into libraries' internals: one function per hook.

Everything else uses public APIs. What is left here has no public API in the pinned versions;
each docstring says what the hook does, why it is needed and which public API is missing.
tests/test_library_hooks.py runs every hook against the installed libraries, so a release that
moves or renames an internal fails there, by name, instead of deep inside a search. Each
library is imported inside its hook: the core (torch only) imports this module too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search.optuna import OptunaSearch
    from torch import nn


# ----------------------------------------------------------------------------------------
# Ray Tune: OptunaSearch and ASHA (tune/study.py, tune/scheduler.py)


def optuna_search_study(searcher: OptunaSearch) -> optuna.Study:
    """The Optuna study that Ray Tune's OptunaSearch created and asks and tells through.

    StudySearch must tell trials, and take over a trial, through this very study: it carries the
    search's seeded sampler. OptunaSearch keeps it in ``_ot_study`` and has no accessor.
    """
    return searcher._ot_study


def optuna_search_trials(searcher: OptunaSearch) -> dict[str, optuna.Trial]:
    """OptunaSearch's own map of Tune trial id -> live Optuna trial (the object itself, not a copy).

    StudySearch hands a RUNNING trial that a killed driver left behind to the next Tune trial by
    putting it in this map: OptunaSearch.suggest asks Optuna for a new trial only for an id that is
    not in it. The map is ``_ot_trials``; OptunaSearch has no accessor and no way to pass a trial in.
    """
    return searcher._ot_trials


def asha_uncount_stop(scheduler: AsyncHyperBandScheduler) -> None:
    """Take back one "stopped" from ASHA's count, for a STOP decision the caller overrules.

    ASHA counts every STOP it decides (``_num_stopped``, shown in its debug_string) before the
    caller sees the decision; BaselineSparingASHA turns some into CONTINUE. ASHA has no public way
    to overrule a decision or to correct its count.
    """
    scheduler._num_stopped -= 1


# ----------------------------------------------------------------------------------------
# Ray core: finding and joining a cluster on this node (tune/cluster.py)


def ray_address_file(temp_dir: str | None = None) -> Path:
    """The file where ``ray start`` records the address of the cluster it started on this node
    (``ray_current_cluster`` in Ray's temp dir; ``temp_dir`` None: Ray's default temp dir).

    ``ray.init(address="auto")`` reads it, but only to connect at once, retrying for minutes: the
    search first checks that something answers there. Ray has no public function for the path
    (its default temp dir follows RAY_TMPDIR, then TMPDIR on Linux, then /tmp).
    """
    from ray._common.utils import get_default_ray_temp_dir, get_ray_address_file

    return Path(get_ray_address_file(temp_dir or get_default_ray_temp_dir()))


def use_ray_token_if_available() -> bool:
    """Turn on Ray's token authentication for this process when RAY_AUTH_MODE is unset and the
    node has a token; returns whether token authentication is on.

    What ``ray.init(address="auto")`` does for a cluster it finds on this node, for a search that
    joins such a cluster by the address it read from ``ray_address_file`` (given explicitly, Ray
    never sends the token unasked). Ray has no public call for it; RAY_AUTH_MODE=token is the
    public way, which a user would have to set by hand.
    """
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def tune_reporters_keep_their_start_time() -> None:
    """Keep Ray Tune's progress reporters from losing their start time, so that a failing trial
    ends as a failed trial instead of ending the whole experiment.

    With its console output on (Ray's default), every Tuner gets Ray's own progress reporter,
    verbose=0 included, and there is no option to leave it out. Tune sets it up with the
    experiment's start time, then again, through its callback list, without one: its start time
    becomes None. The first trial that raises (or that ``max_failures`` retries) then breaks the
    reporter's error line (``datetime.fromtimestamp(None)``), and Tune ends the experiment with a
    TuneError. Patched once per process: a setup without a start time keeps the one it had.
    """
    from ray.tune.experimental import output

    setup = output.ProgressReporter.setup
    if getattr(setup, "keeps_start_time", False):
        return

    def setup_keeping_start_time(self, start_time: float | None = None, **kwargs: Any) -> None:
        setup(self, start_time=self._start_time if start_time is None else start_time, **kwargs)

    setup_keeping_start_time.keeps_start_time = True  # type: ignore[attr-defined]
    output.ProgressReporter.setup = setup_keeping_start_time


# ----------------------------------------------------------------------------------------
# Ray Train (lrra/distributed.py)


def ray_train_report_logger() -> logging.Logger | None:
    """The logger of Ray Train's "Reporting training result ..." INFO line (one per rank and epoch,
    each repeating every metric); None when this Ray has no such module.

    Ray Train V2 names that logger after its file path, not "ray.train...", so RunConfig's
    LoggingConfig does not reach it and neither does the "ray.train" logger; there is no public
    name to quiet it by.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return logging.getLogger(context.__file__)


# ----------------------------------------------------------------------------------------
# MLflow: logging a student (lrra/tracking/student.py)


@contextmanager
def mlflow_requirements_checked_against(packages: Iterable[str]) -> Iterator[None]:
    """While logging a model whose ``pip_requirements`` name only ``packages``, let MLflow check
    them without first mapping every installed distribution to its modules.

    MLflow checks a model's requirements against the environment even when they are given
    explicitly, and builds for that, once per process, a map of every installed distribution's
    top-level modules (``importlib_metadata.packages_distributions``, which reads every
    distribution's file list): 1.7 s of the ~8 CPU-seconds a digits trial costs on a 2-core box,
    and every trial is a new process. The check itself needs only the named packages, so the map
    (``_MODULES_TO_PACKAGES`` in ``mlflow.utils.requirements_utils``) holds just those while the
    model is logged, and is left unbuilt again afterwards, so that a later inference of another
    model's requirements in this process still sees every package. MLflow has no switch to skip the
    check and no way to pass the map. Package and module names must be the same (torch, mlflow).
    """
    from mlflow.utils import requirements_utils

    if requirements_utils._MODULES_TO_PACKAGES is not None:  # built already: nothing left to save
        yield
        return
    only_these = {name: [name] for name in packages}
    requirements_utils._MODULES_TO_PACKAGES = only_these
    try:
        yield
    finally:
        if requirements_utils._MODULES_TO_PACKAGES is only_these:
            requirements_utils._MODULES_TO_PACKAGES = None
            requirements_utils._PACKAGES_TO_MODULES = None


# ----------------------------------------------------------------------------------------
# torch (lrra/meta.py, lrra/batchnorm_prior.py)


def batch_norm_base() -> type[nn.Module]:
    """The base class of every torch batch norm layer (BatchNorm1d/2d/3d, their Lazy forms,
    SyncBatchNorm and any subclass of them): ``torch.nn.modules.batchnorm._BatchNorm``.

    The student update needs to know whether a model normalises over the batch, and the BatchNorm
    prior hooks every such layer of a user's teacher. torch has no public base class: a tuple of the
    public ones would miss a library's layer derived from the base class itself.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


# ----------------------------------------------------------------------------------------
# Used by the tests only: what Ray itself checks or detects


def ray_prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """The cluster config as ``ray up`` prepares it before calling the cloud provider: the
    provider's defaults merged in, node types filled (``config`` itself may change).

    tests/test_cluster_config.py checks cluster.yaml with it. Ray's only public route is ``ray up``
    (or ``ray.autoscaler.sdk``), which goes on to call AWS.
    """
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(config)


def ray_validate_cluster_config(config: dict[str, Any]) -> None:
    """Ray's own check of a cluster config (its JSON schema and more), as ``ray up`` and the
    autoscaler's monitor run it; raises on a bad config. Used by tests/test_cluster_config.py.

    No public API validates a config without acting on it.
    """
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def ray_detected_cpus() -> float:
    """The CPUs Ray detects on this machine (cgroup limits included), without starting Ray: what a
    local Ray advertises. The tests compare the search's cluster tags with it.

    The public ``ray.cluster_resources()`` needs a running Ray, the very thing under test.
    """
    from ray._private.utils import get_num_cpus

    return get_num_cpus()
