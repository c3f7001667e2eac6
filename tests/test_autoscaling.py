"""A search on an autoscaling cluster that starts with the head alone (Ray's fake multi-node provider).

The head offers no CPU (the trials' drivers need none, only its lrra_driver units); the Ray Train
workers' CPUs exist only once the autoscaler adds a node, which it does because the trials ask for
them. The search knows the cluster can grow (its settings name the autoscaler's config), so it
does not refuse the trials or size them to the head. The whole cluster lives in one network
namespace of its own, so the fake provider's fixed ports (GCS on 6379) meet no other Ray on this
machine.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from lrra.distributed import NODE_ID_TAG
from lrra.tracking import TAG_KIND
from tests.netns_cluster import NetnsCluster, can_make_namespaces
from tune.cluster import SETTINGS_ENV
from tune.search_tracking import SEARCH_EXPERIMENT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not can_make_namespaces(), reason="needs root and ip netns")]

FAKE_CONFIG = ROOT / "tests" / "fake_autoscaling.yaml"


def test_the_autoscaler_adds_a_node_for_the_trials_and_the_search_finishes(tmp_path, digits_teacher):
    root = Path("/tmp") / f"lrra-as-{os.getpid()}"
    root.mkdir()
    storage, settings = tmp_path / "storage", tmp_path / "lrra" / "cluster.json"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, SETTINGS_ENV: str(settings),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with NetnsCluster(root, [{"CPU": 0, "lrra_driver": 8}], head_args=[f"--autoscaling-config={FAKE_CONFIG}"],
                      env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as cluster:
        done = subprocess.run(cluster.exec_in(0, [sys.executable, str(ROOT / "tune" / "head.py"), "settings",
                                                  "--storage-path", str(storage),
                                                  "--autoscaling-config", str(FAKE_CONFIG)]),
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr

        assert len(cluster.alive_nodes()) == 1
        search_env = {**env, "RAY_ADDRESS": cluster.address, **cluster.auth_env}
        started = time.monotonic()
        search = subprocess.Popen(cluster.exec_in(0, [
            sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test", "--teacher", str(digits_teacher[0]),
            "--data-dir", str(tmp_path / "data"), "--name", "grown", "--num-samples", "2", "--epochs", "2"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=search_env, cwd=ROOT)
        # The time the first trial started (its driver on the head; its worker now waits for a node).
        lines, first_trial = [], []

        def read_stderr():
            for line in search.stderr:
                lines.append(line)
                if " started (" in line and not first_trial:
                    first_trial.append(time.monotonic())

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        joined_at, most_nodes = None, 1
        while search.poll() is None:
            count = len(cluster.alive_nodes())
            most_nodes = max(most_nodes, count)
            if count > 1 and joined_at is None:
                joined_at = time.monotonic()
            assert time.monotonic() - started < 900, "the search did not finish"
            time.sleep(1)
        reader.join(timeout=30)
        wall_s = time.monotonic() - started
        stderr = "".join(lines)
        assert search.returncode == 0, stderr[-4000:]
        assert "with 1 node(s), 0 CPU(s)" in stderr  # what it found when it started
        assert most_nodes > 1 and joined_at is not None, "the autoscaler added no node"

        rows = pq.read_table(storage / "grown" / "results.parquet").to_pylist()
        assert len(rows) == 2 and all(row["stop_reason"] in ("completed", "early-stopped") for row in rows)
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name(SEARCH_EXPERIMENT).experiment_id],
                                  f"tags.`{TAG_KIND}` = 'trial'")
        head_id = next(n["NodeID"] for n in cluster.alive_nodes() if n["Resources"].get("lrra_driver"))
        placed = {run.data.tags[NODE_ID_TAG] for run in runs}
        assert len(runs) == 2 and head_id not in placed  # every rank 0 ran on a node the autoscaler added
        pending_to_joined = joined_at - first_trial[0] if first_trial else float("nan")
        print(f"\nautoscaling: search {wall_s:.1f} s; first trial started -> node joined {pending_to_joined:.1f} s; "
              f"up to {most_nodes} nodes; rank-0 nodes {sorted(placed)}")
    assert cluster.stopped()
