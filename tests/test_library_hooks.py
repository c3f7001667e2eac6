"""lrra/library_hooks.py against the installed libraries: one test per hook.

Each hook reaches a library's internals; each test here exercises it for real (a real Optuna study,
Ray Tune's own searcher and scheduler, Ray's own functions), so that a release which moves or
changes an internal fails here by name. No Ray is started.
"""

import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch
from torch import nn

from lrra import library_hooks as hooks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def searcher(tmp_path) -> OptunaSearch:
    """Ray Tune's plain OptunaSearch on a SQLite study, as StudySearch builds it."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return OptunaSearch(space={"lr": FloatDistribution(0.01, 0.1)}, metric="val", mode="max",
                        sampler=optuna.samplers.RandomSampler(seed=0), study_name="s", storage=storage)


def test_optuna_search_study_is_the_study_it_asks_and_tells_through(searcher):
    study = hooks.optuna_search_study(searcher)
    assert isinstance(study, optuna.Study) and study.study_name == "s"
    config = searcher.suggest("a")
    (asked,) = study.get_trials(deepcopy=False)
    assert asked.state == TrialState.RUNNING and asked.params == config
    searcher.on_trial_complete("a", {"val": 0.5})
    (told,) = study.get_trials(deepcopy=False)
    assert told.state == TrialState.COMPLETE and told.value == 0.5


def test_optuna_search_trials_is_its_live_map_and_a_trial_put_in_is_used(searcher):
    first = searcher.suggest("a")
    trials = hooks.optuna_search_trials(searcher)
    assert set(trials) == {"a"} and isinstance(trials["a"], optuna.Trial)
    trials["b"] = trials["a"]  # what StudySearch does to take a trial over
    assert searcher.suggest("b") == first
    assert len(hooks.optuna_search_study(searcher).get_trials(deepcopy=False)) == 1  # nothing new asked


def test_asha_uncount_stop_takes_one_stop_back_from_ashas_count():
    scheduler = ASHAScheduler(time_attr="epochs_done", metric="val", mode="max", max_t=9, grace_period=1,
                              reduction_factor=3)
    leader, weak = (Trial("run_trial", config={"n": n}, stub=True) for n in range(2))
    for trial in (leader, weak):
        scheduler.on_trial_add(None, trial)
    scheduler.on_trial_result(None, leader, {"epochs_done": 1, "val": 0.9})
    assert scheduler.on_trial_result(None, weak, {"epochs_done": 1, "val": 0.1}) == TrialScheduler.STOP
    assert "num_stopped=1" in scheduler.debug_string()
    hooks.asha_uncount_stop(scheduler)
    assert "num_stopped=0" in scheduler.debug_string()


def test_ray_address_file_is_ray_current_cluster_in_rays_temp_dir(tmp_path, monkeypatch):
    assert hooks.ray_address_file(str(tmp_path)) == tmp_path / "ray_current_cluster"
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # what Ray's default temp dir follows first
    assert hooks.ray_address_file() == tmp_path / "ray" / "ray_current_cluster"


def token_hook_answer(env: dict[str, str]) -> bool:
    """The hook's answer in a fresh process: Ray keeps the auth mode it settled on for the rest of a
    process, and other tests in this one may have started a Ray with a token."""
    # It must answer, and change nothing a user sets (RAY_AUTH_MODE stays as it was).
    code = ("import os; before = os.environ.get('RAY_AUTH_MODE'); "
            "from lrra.library_hooks import use_ray_token_if_available as hook; answer = hook(); "
            "assert os.environ.get('RAY_AUTH_MODE') == before; print(answer)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"True": True, "False": False}[done.stdout.strip().splitlines()[-1]]


def test_use_ray_token_if_available_follows_ray_auth_mode_and_the_nodes_token(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    assert token_hook_answer({**env, "RAY_AUTH_MODE": "token"}) is True  # set explicitly: Ray's answer
    assert token_hook_answer({**env, "RAY_AUTH_MODE": "disabled"}) is False
    # Unset, and no token on this "node" (the case that turns nothing on): Ray looks and finds none.
    assert token_hook_answer(env) is False


def test_ray_train_report_logger_is_the_one_of_the_reporting_line():
    report_logger = hooks.ray_train_report_logger()
    assert isinstance(report_logger, logging.Logger)
    # Named after the file that logs "Reporting training result ...", which must still do so.
    assert "Reporting training result" in Path(report_logger.name).read_text()


def test_batch_norm_base_is_the_base_of_torchs_batch_norm_layers():
    base = hooks.batch_norm_base()
    for layer in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm2d):
        assert issubclass(layer, base), layer
    for layer in (nn.InstanceNorm2d, nn.LayerNorm, nn.GroupNorm, nn.Conv2d):
        assert not issubclass(layer, base), layer
    assert base(4).track_running_stats  # the attribute the BatchNorm prior reads


def test_ray_prepare_cluster_config_fills_in_the_config_as_ray_up_does():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert "max_workers" not in config["available_node_types"]["head"]
    prepared = hooks.ray_prepare_cluster_config(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # filled in, as `ray up` does


def test_ray_validate_cluster_config_accepts_a_good_config_and_rejects_a_bad_one():
    config = yaml.safe_load((ROOT / "tests" / "fake_autoscaling.yaml").read_text())
    hooks.ray_validate_cluster_config(config)
    with pytest.raises(Exception, match="max_nodes"):
        hooks.ray_validate_cluster_config({**config, "max_nodes": 4})  # a typo of max_workers


def test_ray_detected_cpus_is_this_machines_count():
    cpus = hooks.ray_detected_cpus()
    assert 0 < cpus <= os.cpu_count()


def test_mlflow_requirements_checked_against_the_named_packages_only(tmp_path, monkeypatch):
    import mlflow.pytorch
    from mlflow.utils import requirements_utils

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a new process
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)

    def scan_every_package():
        raise AssertionError("MLflow scanned every installed package")

    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", scan_every_package)
    warnings = []  # MLflow's loggers do not propagate to pytest's
    monkeypatch.setattr(requirements_utils._logger, "warning", lambda message, *args: warnings.append(message % args))
    example = torch.zeros(2, 3)
    with hooks.mlflow_requirements_checked_against(["torch", "mlflow"]):
        mlflow.pytorch.save_model(nn.Linear(3, 2).eval(), tmp_path / "model", input_example=example.numpy(),
                                  pip_requirements=["torch==0.0.1", f"mlflow=={mlflow.__version__}"])
    # MLflow still checked the requirements against the installed packages: torch's is not 0.0.1
    [warning] = warnings
    assert f"torch (current: {version('torch')}, required: torch==0.0.1)" in warning and "mlflow (" not in warning
    # ...and left its map unbuilt again, for whatever else this process logs
    assert requirements_utils._MODULES_TO_PACKAGES is None


@pytest.mark.slow
def test_a_trial_that_raises_fails_alone_and_the_tuner_finishes(tmp_path):
    """Ray's own progress reporter, set up by Tune without a start time, would end the experiment at
    the first trial that raises; with the hook (applied by the search's progress lines) only that
    trial fails."""
    import ray
    from ray import tune

    from tune.report import ProgressLines

    def fails(config):
        raise RuntimeError("this trial fails")

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        results = tune.Tuner(fails, tune_config=tune.TuneConfig(num_samples=1),
                             run_config=tune.RunConfig(storage_path=str(tmp_path), name="fails", verbose=0,
                                                       callbacks=[ProgressLines(epochs=1, num_samples=1)])).fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 1 and "this trial fails" in str(results.errors[0])
