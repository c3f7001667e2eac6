"""What a search is: settings fixed when it starts, saved as ``<experiment>/search.json``.

``--resume`` reads them back, so a resumed search continues with the same base configuration,
space, teacher, study and per-trial resources whatever flags it is given.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs

from lrra.config import ConfigError, LRRAConfig
from tune.space import Space, space_from_json, space_to_json

PLAN_FILE = "search.json"
RESULTS_FILE = "results.parquet"
TRAIN_FOLDER = "train"  # one Ray Train run per trial, named by its Tune trial id


@dataclass(frozen=True)
class PresetBudget:
    """How much searching a preset gets by default."""

    num_samples: int
    time_budget_s: float | None
    grace_period: int  # epochs every trial runs before ASHA may stop it


# mnist: ~8-9 s per epoch on two CPU cores (two single-thread trials side by side), 4-5 min per full
# trial: its three baselines in full, then sampled trials, most stopped after 3 or 9 epochs. With a
# 12-minute budget the search ran into it with 8 and with 7 trials, and the README's first command
# took 16.0 and 16.5 min in all (install 2.5-3.3, teacher 1, search 12.2): 10 minutes keeps it
# under 15, and the three baselines (the champion has always been one) still end within it.
BUDGETS: dict[str, PresetBudget] = {
    "mnist": PresetBudget(num_samples=7, time_budget_s=10 * 60, grace_period=3),
    "digits": PresetBudget(num_samples=6, time_budget_s=5 * 60, grace_period=1),
}
CLUSTER_BUDGET = PresetBudget(num_samples=32, time_budget_s=None, grace_period=20)  # the ResNet presets
SMOKE_TEST = dict(preset="digits", num_samples=3, epochs=3, iters_per_epoch=10,
                  time_budget_s=15 * 60)  # a safety stop only: a busy CI box must not turn trials into "time budget"


@dataclass
class SearchPlan:
    name: str
    storage_path: str          # absolute path or URI; the experiment is storage_path/name
    config: dict[str, Any]     # the base LRRAConfig (teacher_path resolved); knobs override it per trial
    space: Space
    points_to_evaluate: list[dict[str, Any]]
    num_samples: int
    time_budget_s: float | None
    grace_period: int
    reduction_factor: float
    workers_per_trial: int
    cpus_per_worker: float | None  # None until fit to the cluster (tune/search.py fit_resources)
    gpus_per_worker: float | None
    driver_cpus: float         # the trial's own process (Tune function + Ray Train controller)
    study_storage: str
    max_concurrent_trials: int = 1     # derived from the cluster (tune/search.py fit_resources)
    concurrent_trials_limit: int | None = None  # --max-concurrent-trials: at most this many, if given
    created: str = field(default="")
    tracking_uri: str = ""     # the MLflow store; --resume logs to it unless given another

    @property
    def cfg(self) -> LRRAConfig:
        return LRRAConfig.from_dict(self.config)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def train_path(self) -> str:
        return f"{self.experiment_path}/{TRAIN_FOLDER}"

    @property
    def results_path(self) -> str:
        return f"{self.experiment_path}/{RESULTS_FILE}"

    @property
    def study_name(self) -> str:
        return self.name

    @property
    def most_at_once(self) -> int:
        """Never more trials at once than there are, nor than --max-concurrent-trials."""
        return min(self.num_samples, self.concurrent_trials_limit or self.num_samples)

    def trial_resources(self) -> dict[str, float]:
        """Everything one trial reserves: its driver plus its Ray Train workers."""
        return {"CPU": self.driver_cpus + self.workers_per_trial * self.cpus_per_worker,
                "GPU": self.workers_per_trial * self.gpus_per_worker}

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["space"] = space_to_json(self.space)
        return json.dumps(values, indent=2)

    @classmethod
    def from_json(cls, text: str) -> SearchPlan:
        values = json.loads(text)
        values["space"] = space_from_json(values["space"])
        return cls(**values)


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path in it) for a local path or a URI such as s3://bucket/runs."""
    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).absolute())


def save_plan(plan: SearchPlan) -> None:
    fs, path = filesystem(f"{plan.experiment_path}/{PLAN_FILE}")
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(plan.to_json().encode())


def load_plan(storage_path: str, name: str | None) -> SearchPlan:
    """The plan of experiment ``name`` under ``storage_path``; None means the latest one started."""
    fs, root = filesystem(storage_path)
    if name is None:
        folders = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
                   if info.type == pyarrow.fs.FileType.Directory]
        plans = [info for info in fs.get_file_info([f"{folder}/{PLAN_FILE}" for folder in folders])
                 if info.type == pyarrow.fs.FileType.File]
        if not plans:
            raise ConfigError(f"--resume: no search to resume under {storage_path} (no */{PLAN_FILE})")
        path = max(plans, key=lambda info: info.mtime).path
    else:
        path = f"{root}/{name}/{PLAN_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            raise ConfigError(f"--resume {name}: no search of that name under {storage_path} ({path} is missing)")
    with fs.open_input_stream(path) as f:
        return SearchPlan.from_json(f.readall().decode())
