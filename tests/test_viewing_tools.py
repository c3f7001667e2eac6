"""The tools a finished search points to are installed and serve it: the exact optuna-dashboard and
``mlflow ui`` commands its last lines print, started on loopback, serve its study and its parent and
child runs over HTTP."""

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.services import free_port
from tune.head import without_mlflow_jobs
from tune.search_tracking import SEARCH_EXPERIMENT
from tune.study import BEST_STUDENT_TRIAL, METRIC_NAME

ROOT = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent  # the environment's console scripts: optuna-dashboard, mlflow


def printed_command(stdout: str, label: str) -> list[str]:
    """The command the search's summary prints after ``label``, split as a shell would."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith(label))
    return shlex.split(line.strip().removeprefix(label))


@contextlib.contextmanager
def serving(command: list[str], url: str, log: Path):
    """Start ``command`` (its program taken from this environment) and wait until ``url`` answers.
    MLflow's job runner stays off, as on the head (tune/head.py): LRRA submits no MLflow jobs."""
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / command[0]), *command[1:]], stdout=out, stderr=subprocess.STDOUT,
                                  env=without_mlflow_jobs(os.environ))
    try:
        deadline = time.monotonic() + 120  # a guard against hangs: both start in seconds on an idle machine
        while True:
            assert server.poll() is None, f"{command[0]} exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{command[0]} did not answer: {log.read_text()[-2000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2):
                    break
            time.sleep(0.5)
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def get_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study_of_a_finished_search(finished_smoke_search, tmp_path):
    search = finished_smoke_search
    assert search.done.returncode == 0, search.done.stderr[-3000:]
    command = printed_command(search.done.stdout, "Optuna dashboard")
    assert command == ["optuna-dashboard", search.study_url]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving([*command, "--host", "127.0.0.1", "--port", str(port)], f"{url}/api/studies", tmp_path / "od.log"):
        studies = {s["study_name"]: s for s in get_json(f"{url}/api/studies")["study_summaries"]}
        assert search.name in studies
        detail = get_json(f"{url}/api/studies/{studies[search.name]['study_id']}")
        assert len(detail["trials"]) == 3
        # what its page names the value by, and where the study's runs and teacher are
        assert detail["objective_names"] == [METRIC_NAME]
        attributes = {a["key"]: a["value"] for a in detail["user_attrs"]}
        assert attributes["mlflow_experiment"] == SEARCH_EXPERIMENT and attributes["mlflow_tracking_uri"]
        assert {"search_folder", "teacher", "dataset", BEST_STUDENT_TRIAL} <= set(attributes)  # which trial won
        with urllib.request.urlopen(f"{url}/dashboard/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()


@pytest.mark.slow
def test_mlflow_ui_serves_the_parent_and_child_runs_of_a_finished_search(finished_smoke_search, tmp_path):
    search = finished_smoke_search
    assert search.done.returncode == 0, search.done.stderr[-3000:]
    command = printed_command(search.done.stdout, "MLflow UI")
    assert command == ["mlflow", "ui", "--backend-store-uri", search.tracking_uri]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # One worker process: the default several take a minute to start on two busy cores.
    with serving([*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], f"{url}/health",
                 tmp_path / "mlflow.log"):
        experiment = get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={SEARCH_EXPERIMENT}")
        kind = {t["key"]: t["value"] for t in experiment["experiment"].get("tags", [])}["mlflow.experimentKind"]
        assert kind == "custom_model_development"  # MLflow 3 opens it on the runs, not the GenAI overview
        runs = get_json(f"{url}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        parents = [run for run, tag in zip(runs, tags, strict=True) if tag.get("mlflow.runName") == search.name]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = [tag for tag in tags if tag.get("mlflow.parentRunId") == parent_id]
        assert len(children) == 3
        # one name per trial, as Optuna numbers it and as Tune names its folder
        assert all(re.fullmatch(r"trial-\d{2} · \w+", child["mlflow.runName"]) for child in children)
        assert {child["mlflow.runName"].split(" · ")[1] for child in children} == {
            child["lrra.trial_id"] for child in children}
        # each trial's description says how it ended and which student it kept
        assert all(child["mlflow.note.content"].startswith(f"Ended: {child['lrra.stop_reason']}, after ")
                   and "Kept student: epoch " in child["mlflow.note.content"] for child in children)
        # the parent run is the search's summary: the champion and how the trials ended
        metrics = {m["key"]: m["value"] for m in parents[0]["data"]["metrics"]}
        assert metrics["search/best_val_acc"] > 0 and sum(
            value for key, value in metrics.items() if key.startswith("search/trials_")) == 3
        assert "**Champion: trial-" in tags[runs.index(parents[0])]["mlflow.note.content"]
        # the printed address opens a shared view of this search's trials, with the accuracies in view
        view = re.search(r"then http://127.0.0.1:5000/(#/experiments/(\d+)/runs\?viewStateShareKey=([\w-]+))",
                         search.done.stdout)
        assert view and view.group(2) == experiment["experiment"]["experiment_id"]
        experiment_tags = {t["key"]: t["value"] for t in get_json(
            f"{url}/api/2.0/mlflow/experiments/get?experiment_id={view.group(2)}")["experiment"]["tags"]}
        state = json.loads(experiment_tags[f"mlflow.sharedViewState.{view.group(3)}"])
        assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent_id}'"
        assert state["orderByKey"] == "metrics.`val/best_student_acc`" and state["orderByAsc"] is False
        assert {"metrics.`val/best_student_acc`", "metrics.`test/best_student_acc`", "params.`meta_lr`",
                "tags.`lrra.stop_reason`"} <= set(state["selectedColumns"])
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"mlflow" in page.read().lower()
