"""tune/search.py joins a running cluster by itself (tune/cluster.py).

Unit tests of the decision (--address / RAY_ADDRESS / Ray's ray_current_cluster file / nothing) and
of the cluster's settings, then one real test: a head started with `ray start --head` in a private
temp dir, a smoke search with RAY_ADDRESS and no --address, which must run its trials there.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrra.config import ConfigError
from tests.services import free_port
from tune import cluster, head, runtime, search

ROOT = Path(__file__).resolve().parent.parent

RAY = Path(sys.executable).parent / "ray"


# ----------------------------------------------------------------------------------------
# Which Ray: the decision, nothing started.


def address_file(temp_dir: Path, address: str) -> None:
    temp_dir.mkdir(parents=True, exist_ok=True)
    (temp_dir / "ray_current_cluster").write_text(address + "\n")


def test_nothing_running_means_a_private_local_ray(tmp_path):
    target = cluster.choose_ray(None, environ={}, temp_dir=str(tmp_path))
    assert target == cluster.RayTarget(None, "local") and not target.is_cluster


def test_the_address_flag_comes_first(tmp_path):
    address_file(tmp_path, "10.0.0.9:6379")
    target = cluster.choose_ray("10.0.0.1:6379", environ={"RAY_ADDRESS": "10.0.0.2:6379"}, temp_dir=str(tmp_path))
    assert target == cluster.RayTarget("10.0.0.1:6379", "--address")


def test_ray_address_comes_before_the_file(tmp_path):
    address_file(tmp_path, "10.0.0.9:6379")
    target = cluster.choose_ray(None, environ={"RAY_ADDRESS": "10.0.0.2:6379"}, temp_dir=str(tmp_path))
    assert target == cluster.RayTarget("10.0.0.2:6379", "RAY_ADDRESS")


def test_ray_address_local_keeps_the_private_ray(tmp_path):
    address_file(tmp_path, "10.0.0.9:6379")
    assert not cluster.choose_ray(None, environ={"RAY_ADDRESS": "local"}, temp_dir=str(tmp_path)).is_cluster


def test_a_cluster_started_on_this_node_is_joined_when_it_answers(tmp_path):
    address_file(tmp_path, "10.0.0.9:6379")
    target = cluster.choose_ray(None, environ={}, temp_dir=str(tmp_path), alive=lambda address: True)
    assert target == cluster.RayTarget("10.0.0.9:6379", str(tmp_path / "ray_current_cluster"))


def test_a_stale_address_file_is_ignored(tmp_path):
    """A crashed cluster leaves its file behind: nothing listens there, so the search runs locally."""
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address_file(tmp_path, f"127.0.0.1:{port}")
    assert not cluster.choose_ray(None, environ={}, temp_dir=str(tmp_path)).is_cluster


# ----------------------------------------------------------------------------------------
# The cluster's settings: defaults that flags override.


def settings_file(tmp_path: Path, **values) -> Path:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(values))
    return path


def applied(argv: list[str], settings: dict, environ: dict | None = None) -> tuple[argparse.Namespace, dict]:
    args = search.build_parser().parse_args(argv)
    used = cluster.apply_settings(args, settings, cluster.given_options(search.build_parser, argv), environ or {})
    return args, used


SETTINGS = {"preset": "cifar10", "storage_path": "s3://bucket/lrra", "tracking_uri": "http://10.0.0.5:5000",
            "study_storage": "sqlite:////home/ray/.lrra/optuna.db"}


def test_settings_fill_what_the_command_line_leaves_out():
    args, used = applied([], SETTINGS)
    assert used == SETTINGS
    assert (args.preset, args.storage_path, args.tracking_uri, args.study_storage) == tuple(SETTINGS.values())


def test_flags_win_even_when_they_equal_the_default():
    args, used = applied(["--storage-path", search.DEFAULT_STORAGE, "--preset", "mnist"], SETTINGS)
    assert args.storage_path == search.DEFAULT_STORAGE and args.preset == "mnist"
    assert "storage_path" not in used and "preset" not in used and used["tracking_uri"] == SETTINGS["tracking_uri"]


def test_smoke_tests_resumes_and_mlflow_tracking_uri_keep_their_own():
    args, used = applied(["--smoke-test"], SETTINGS)
    assert args.preset is None and "preset" not in used
    args, used = applied(["--resume"], SETTINGS)
    assert set(used) == {"storage_path", "tracking_uri"}  # a resumed search keeps its preset and study
    args, used = applied([], SETTINGS, environ={"MLFLOW_TRACKING_URI": "sqlite:///mine.db"})
    assert args.tracking_uri is None and "tracking_uri" not in used


def test_read_settings(tmp_path):
    assert cluster.read_settings(tmp_path / "absent.json") == {}
    path = settings_file(tmp_path, **SETTINGS, mlflow={"port": 5000})
    assert cluster.read_settings(path) == SETTINGS
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['storage'\]; allowed: \['preset'"):
        cluster.read_settings(settings_file(tmp_path, storage="s3://x"))
    with pytest.raises(ConfigError, match="'preset' must be a non-empty string"):
        cluster.read_settings(settings_file(tmp_path, preset=""))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable as JSON"):
        cluster.read_settings(tmp_path / "bad.json")


def test_the_heads_mlflow_server_starts_without_mlflows_job_runner_unless_the_user_asks():
    assert head.without_mlflow_jobs({"PATH": "/bin"}) == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": "/bin"}
    asked = head.without_mlflow_jobs({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})
    assert asked == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}


def test_head_writes_the_settings_the_search_reads(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.SETTINGS_ENV, str(tmp_path / "lrra" / "cluster.json"))
    head.main(["settings", "--storage-path", "s3://bucket/lrra/", "--preset", "cifar100", "--host", "10.1.2.3"])
    assert cluster.read_settings(cluster.settings_path()) == {
        "preset": "cifar100", "storage_path": "s3://bucket/lrra", "tracking_uri": "http://10.1.2.3:5000",
        "study_storage": f"sqlite:///{tmp_path / 'lrra' / 'optuna.db'}"}
    head.main(["settings", "--storage-path", "/shared/lrra", "--host", "10.1.2.3",
               "--autoscaling-config", str(ROOT / "cluster.yaml")])
    assert cluster.read_settings(cluster.settings_path())["autoscaling_config"] == str(ROOT / "cluster.yaml")
    mlflow = json.loads(cluster.settings_path().read_text())["mlflow"]
    assert mlflow["artifacts_destination"] == "/shared/lrra/mlflow-artifacts"
    assert mlflow["backend_store_uri"] == f"sqlite:///{tmp_path / 'lrra' / 'mlflow.db'}"


def test_a_dead_ray_address_fails_fast_naming_it(monkeypatch, capsys, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    started = time.monotonic()
    assert search.main(["--preset", "digits", "--storage-path", str(tmp_path / "runs")]) == 2
    assert f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers there" in capsys.readouterr().err
    assert time.monotonic() - started < 10


# ----------------------------------------------------------------------------------------
# A real head on this machine, joined through RAY_ADDRESS.


def token_env(folder: Path) -> dict[str, str]:
    """Ray's token authentication with a token of this test's own (not the machine's ~/.ray/auth_token)."""
    token = folder / "ray-token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@pytest.fixture
def ray_head(tmp_path):
    """(address, temp dir) of a real `ray start --head` with a private temp dir and its own auth
    token (token_env(tmp_path)); stopped afterwards.

    Started in its own process group and stopped by killing that group only: other Ray
    instances on this machine are left alone.
    """
    temp_dir = Path("/tmp") / f"lrra-head-{os.getpid()}"  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "", **token_env(tmp_path)}
    head_process = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", "--num-cpus=2", "--resources", json.dumps({cluster.DRIVER_RESOURCE: 8}),
         "--include-dashboard=true", "--dashboard-port", str(free_port()), "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not cluster.answers(address):
            assert head_process.poll() is None, head_process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        yield address, temp_dir
    finally:
        os.killpg(head_process.pid, signal.SIGTERM)
        try:
            head_process.wait(timeout=5)  # `ray start --block` takes ~30 s to stop gracefully; nothing here needs it
        except subprocess.TimeoutExpired:
            os.killpg(head_process.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-g", str(head_process.pid)], check=False)  # stragglers of that group
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_search_joins_the_cluster_named_by_ray_address(ray_head, tmp_path, digits_teacher):
    address, _ = ray_head
    storage = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": address, cluster.SETTINGS_ENV: str(tmp_path / "no-settings.json")}
    command = [sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test", "--teacher", str(digits_teacher[0]),
               "--storage-path", str(storage), "--data-dir", str(tmp_path / "data"), "--name", "joined",
               "--num-samples", "1", "--epochs", "1"]  # joining is the point, not searching
    # Without the token mode the head refuses the search: one line says what to set.
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")})
    assert refused.returncode == 2
    assert f"RAY_ADDRESS {address}: cannot join that Ray cluster" in refused.stderr
    assert "set RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr

    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**env, **token_env(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ray: joined the cluster at {address} (found via RAY_ADDRESS) with 1 node(s), 2 CPU(s)" in done.stderr
    # The trials ran in that cluster's Ray session, under its private temp dir.
    import pyarrow.parquet as pq

    rows = pq.read_table(storage / "joined" / "results.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["stop_reason"] == "completed"
    sessions = list((Path(ray_head[1]) / "session_latest" / "logs").glob("worker-*"))
    assert sessions, "no worker logs in the joined cluster's session: the search ran elsewhere"


# ----------------------------------------------------------------------------------------
# An autoscaling cluster: sized to what it can grow to (cluster.yaml starts with no GPU node).


def test_capacity_of_cluster_yaml():
    capacity = cluster.read_capacity(ROOT / "cluster.yaml")
    assert capacity.node_types["gpu_1"] == {"CPU": 8, "GPU": 1}
    assert capacity.total["GPU"] == 8 * 1 + 2 * 4 and capacity.total[cluster.DRIVER_RESOURCE] == 64


def test_an_autoscaling_cluster_with_no_gpu_node_yet_gets_gpu_trials(tmp_path):
    capacity = cluster.read_capacity(ROOT / "cluster.yaml")
    def fitted(*flags: str):
        plan = search.new_plan(search.build_parser().parse_args(["--preset", "digits", *flags]), str(tmp_path))
        return runtime.fit_resources(plan, capacity)  # no Ray: the capacity alone decides

    plan = fitted("--num-samples", "32")
    assert plan.gpus_per_worker == 1.0 and plan.cpus_per_worker == 1.0
    assert plan.max_concurrent_trials == 16  # one trial per GPU the cluster can grow to
    assert fitted("--num-samples", "6").max_concurrent_trials == 6  # never more than there are trials
    assert fitted("--num-samples", "32", "--max-concurrent-trials", "3").max_concurrent_trials == 3

    too_big = search.new_plan(search.build_parser().parse_args(["--preset", "digits", "--gpus-per-worker", "8"]),
                              str(tmp_path))
    with pytest.raises(ConfigError, match=r"one worker needs \{'CPU': 1.0, 'GPU': 8.0\} but no node type"):
        runtime.fit_resources(too_big, capacity)


def test_a_bad_autoscaling_config_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("available_node_types: {}\n")
    with pytest.raises(ConfigError, match=r"autoscaling_config .*bad.yaml cannot be read"):
        cluster.read_capacity(tmp_path / "bad.yaml")


def test_on_a_cluster_whose_settings_name_its_autoscaler_config_the_search_knows_its_capacity(tmp_path, monkeypatch):
    path = settings_file(tmp_path, autoscaling_config=str(ROOT / "cluster.yaml"))
    monkeypatch.setenv(cluster.SETTINGS_ENV, str(path))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    monkeypatch.setattr(cluster, "answers", lambda address: True)  # no cluster needed to decide
    args = search.build_parser().parse_args([])
    target = cluster.prepare(args, [], search.build_parser)
    assert target.address == "10.0.0.9:6379" and target.capacity.total["GPU"] == 16
    assert cluster.trial_max_failures(target) == cluster.CLUSTER_TRIAL_MAX_FAILURES
    monkeypatch.setenv("RAY_ADDRESS", "local")
    local = cluster.prepare(args, [], search.build_parser)
    assert local.capacity is None and cluster.trial_max_failures(local) == 0
