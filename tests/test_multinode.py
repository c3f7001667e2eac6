"""A smoke search on a real multi-node Ray cluster: every node in its own network namespace.

The head (node 0) runs what cluster.yaml puts there: the search driver, the trial drivers (it alone
advertises lrra_driver), the MLflow server started by tune/head.py, the Optuna SQLite study. The
other nodes only offer CPUs for Ray Train workers. The search is given no --address and no
--storage-path or --tracking-uri: it finds the cluster through RAY_ADDRESS and the rest in the
cluster's settings, as on a cluster made by cluster.yaml.

Both tests run on one cluster, in this order, so that it starts once (~20 s on 2 cores): the second
kills a worker node, after the first has needed both.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from lrra.distributed import NODE_HISTORY_TAG, NODE_IP_TAG
from lrra.tracking import TAG_KIND, TAG_TRIAL_ID
from tests.netns_cluster import NetnsCluster, can_make_namespaces
from tests.search_records import study_of
from tune.cluster import DRIVER_RESOURCE, SETTINGS_ENV
from tune.search_tracking import SEARCH_EXPERIMENT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not can_make_namespaces(), reason="needs root and ip netns")]

# As cluster.yaml's: the head advertises no CPU, so no Ray Train worker can land there, and the
# trial drivers (no CPU, one lrra_driver unit each) stay on it; the workers' CPUs are elsewhere.
LAYOUT = [{"CPU": 0, DRIVER_RESOURCE: 8}, {"CPU": 1}, {"CPU": 1}]


def cluster_env(settings: Path) -> dict[str, str]:
    """The search's environment: RAY_ADDRESS is set by the caller; no MLflow store of the tests'."""
    drop = {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, SETTINGS_ENV: str(settings)}


@pytest.fixture(scope="module")
def cluster():
    root = Path("/tmp") / f"lrra-mn-{os.getpid()}"  # short: Ray's socket paths have a length limit
    root.mkdir()
    with NetnsCluster(root, LAYOUT) as started:
        yield started
    assert started.stopped()


def run_on_head(cluster: NetnsCluster, command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.exec_in(0, command), capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def test_a_smoke_search_spreads_over_the_nodes(cluster, tmp_path, digits_teacher):
    storage, settings = tmp_path / "storage", tmp_path / "lrra" / "cluster.json"
    env = cluster_env(settings)
    head_ip = cluster.nodes[0].ip
    # The head commands of cluster.yaml, with a local shared folder for S3; the address of
    # the MLflow server is the head's own, as tune/head.py finds it.
    for command in (["settings", "--storage-path", str(storage)], ["mlflow"]):
        done = run_on_head(cluster, [sys.executable, str(ROOT / "tune" / "head.py"), *command], env, 180)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"http://{head_ip}:5000" in settings.read_text()

    started = time.monotonic()
    search = run_on_head(cluster, [sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test",
                                   "--teacher", str(digits_teacher[0]), "--data-dir", str(tmp_path / "data"),
                                   "--name", "spread", "--num-samples", "2"],
                         {**env, "RAY_ADDRESS": cluster.address, **cluster.auth_env}, timeout=900)
    wall_s = time.monotonic() - started
    assert search.returncode == 0, search.stderr[-4000:]
    nodes = len(LAYOUT)
    assert (f"ray: joined the cluster at {cluster.address} (found via RAY_ADDRESS) with {nodes} node(s)"
            in search.stderr)
    assert f"--storage-path {storage}" in search.stderr and f"--tracking-uri http://{head_ip}:5000" in search.stderr

    # Every trial ran to its end, with its checkpoints in the shared storage.
    rows = pq.read_table(storage / "spread" / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(row["stop_reason"] in ("completed", "early-stopped") for row in rows)
    for row in rows:
        assert list((storage / "spread" / "train" / row["tune_trial_id"]).glob("checkpoint_epoch_*/state.pt"))

    # Each trial's MLflow run (in the head's store) says which node its rank-0 worker ran on.
    mlflow_db = settings.parent / "mlflow.db"
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    experiment = client.get_experiment_by_name(SEARCH_EXPERIMENT)
    trial_runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = 'trial'")
    assert len(trial_runs) == 2 and all(run.info.status == "FINISHED" for run in trial_runs)
    placement = {run.data.tags[TAG_TRIAL_ID]: run.data.tags[NODE_IP_TAG] for run in trial_runs}
    assert all(run.data.tags[NODE_HISTORY_TAG] == run.data.tags[NODE_IP_TAG] for run in trial_runs)
    ips = {node.ip for node in cluster.nodes}
    assert set(placement.values()) <= ips
    # Two trials at once, one worker each, and one CPU on each worker node: one trial per node.
    assert len(set(placement.values())) == 2 and head_ip not in placement.values(), placement
    print(f"\nsmoke search on 3 nodes {wall_s:.1f} s; rank-0 placement {placement}")


def test_a_trial_whose_node_is_lost_continues_on_another_node(cluster, tmp_path, digits_teacher):
    """Kill every process of the node that runs a trial's rank 0, mid-trial: the trial's worker group
    restarts from its last checkpoint on the other node, and every epoch is reported exactly once."""
    import json

    storage, settings = tmp_path / "storage", tmp_path / "lrra" / "cluster.json"
    env = {**cluster_env(settings), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    epochs = 6
    done = run_on_head(cluster, [sys.executable, str(ROOT / "tune" / "head.py"), "settings",
                                 "--storage-path", str(storage)], env, 120)
    assert done.returncode == 0, done.stderr
    search = subprocess.Popen(cluster.exec_in(0, [
        sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test", "--teacher", str(digits_teacher[0]),
        "--data-dir", str(tmp_path / "data"), "--name", "lost", "--num-samples", "1", "--epochs", str(epochs),
        "--set", "iters_per_epoch=60"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**env, "RAY_ADDRESS": cluster.address, **cluster.auth_env})
    try:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        deadline = time.monotonic() + 600
        while True:  # two epochs reported (so checkpointed), and rank 0's node known
            assert search.poll() is None, search.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the trial never reached its second epoch"
            try:
                trial = study_of(settings.parent, "lost").trials[0]
                runs = client.search_runs([client.get_experiment_by_name(SEARCH_EXPERIMENT).experiment_id],
                                          f"tags.`{TAG_KIND}` = 'trial'")
            except (KeyError, IndexError, AttributeError):
                runs, trial = [], None
            if trial is not None and len(trial.intermediate_values) >= 2 and runs \
                    and NODE_IP_TAG in runs[0].data.tags:
                break
            time.sleep(0.5)
        lost_ip = runs[0].data.tags[NODE_IP_TAG]
        lost = next(i for i, node in enumerate(cluster.nodes) if node.ip == lost_ip)
        assert lost != 0
        cluster.kill_node(lost)
        _, stderr = search.communicate(timeout=900)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, stderr[-4000:]

    row = pq.read_table(storage / "lost" / "results.parquet").to_pylist()[0]
    assert row["stop_reason"] == "completed" and row["epochs"] == epochs
    run = client.get_run(runs[0].info.run_id)
    history = run.data.tags[NODE_HISTORY_TAG].split(",")
    assert history[0] == lost_ip and len(history) == 2 and history[1] != lost_ip, history
    assert run.info.status == "FINISHED"
    # Every epoch exactly once: in Tune's results and in MLflow.
    result_file = next((storage / "lost").glob(f"*{row['tune_trial_id']}*/result.json"))
    reported = [json.loads(line)["epochs_done"] for line in result_file.read_text().splitlines()]
    assert reported == list(range(1, epochs + 1)), reported
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/student_acc")]
    assert sorted(steps) == list(range(1, epochs + 1)), steps
    print(f"\nnode lost: rank 0 moved {history[0]} -> {history[1]}; epochs reported {reported}")
