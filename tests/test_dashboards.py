"""dashboards/: the Grafana dashboard's JSON, prometheus.yml, and a real Prometheus scraping a real search.

The live test runs a short smoke search (2 Ray Train workers in one trial) while a real Prometheus
scrapes Ray's metrics endpoints through dashboards/prometheus.yml's service-discovery file, and
queries Prometheus's HTTP API for every expression of the dashboard while the search runs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import build_dashboard
import pytest
import ray
import yaml

from lrra.live_metrics import EXPORTED
from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"

METRIC_NAME = re.compile(r"\bray_[a-z_]+\b")
SPEED_METRIC = "lrra_student_steps_per_second"  # exported by every worker, each under its own rank


def ray_own_metric_names() -> set[str]:
    """The metric names Ray's own Grafana dashboards query (the panels shipped inside the ray package)."""
    panels = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    return {name for source in panels.glob("*_panels.py") for name in METRIC_NAME.findall(source.read_text())}


def needs(tool: str) -> str:
    """The tool's path; CI installs it (.ci/run), so only a developer's machine may lack it."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run installs it (apt-get install prometheus)")
        pytest.skip(f"{tool} is not installed (apt-get install prometheus)")
    return path


# ----------------------------------------------------------------------------------------
# The files, without running anything.


def test_the_committed_dashboard_is_what_the_generator_writes():
    assert (DASHBOARDS / "lrra.json").read_text() == build_dashboard.render(), \
        "dashboards/lrra.json is stale: run python dashboards/build_dashboard.py"


def test_every_panel_and_query_reads_the_datasource_variable():
    board = json.loads((DASHBOARDS / "lrra.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"search", "trial"} <= set(variables)
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    uids = [v["datasource"]["uid"] for v in variables.values() if v["type"] == "query"]
    assert uids and all(uid == "${datasource}" for uid in uids)


def test_every_metric_named_is_exported_by_lrra_or_by_ray():
    board = (DASHBOARDS / "lrra.json").read_text()
    named = set(METRIC_NAME.findall(board))
    ours = {name for name in named if name.startswith("ray_lrra_")}
    assert ours and ours <= set(EXPORTED), ours - set(EXPORTED)
    assert named - ours <= ray_own_metric_names(), (named - ours) - ray_own_metric_names()
    assert named - ours, "the dashboard shows Ray's node and GPU metrics too"


def test_promtool_accepts_prometheus_yml():
    done = subprocess.run([needs("promtool"), "check", "config", str(DASHBOARDS / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    sd_files = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())["scrape_configs"][0]["file_sd_configs"]
    assert sd_files[0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


# ----------------------------------------------------------------------------------------
# A real Prometheus scraping a real search.


def start_prometheus(folder: Path, ray_temp_dir: Path) -> tuple[subprocess.Popen, str]:
    """dashboards/prometheus.yml as it is, but scraping every second, re-reading Ray's
    service-discovery file every two (the test is short), and reading it from ``ray_temp_dir``
    instead of /tmp/ray: every local Ray on the machine points /tmp/ray's link at its own session,
    so any other Ray started on the machine meanwhile (a user's search) would take the file over."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    discovery = config["scrape_configs"][0]["file_sd_configs"][0]
    discovery["refresh_interval"] = "2s"
    discovery["files"] = [str(ray_temp_dir / Path(discovery["files"][0]).name)]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [needs("prometheus"), f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"))
    return process, f"http://127.0.0.1:{port}"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer


def query(prometheus: str, expr: str) -> list[dict]:
    return get_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")["data"]["result"]


def dashboard_expr(expr: str, search: str) -> str:
    """A dashboard expression with its variables set as a user picking this search would set them."""
    return expr.replace("$search", search).replace("$trial", ".*")  # search: a name without regex characters


def complete(expr: str, series: list[dict]) -> bool:
    """Every worker exports its own speed, so that query waits for both ranks' series (one worker's
    metrics may reach Prometheus a scrape before the other's); any series does for the rest."""
    if SPEED_METRIC in expr:
        return {one["metric"]["rank"] for one in series} >= {"0", "1"}
    return bool(series)


@pytest.mark.slow
def test_every_dashboard_query_returns_series_of_a_running_search(tmp_path, digits_teacher):
    system_temp = Path("/tmp") / f"lrra-prom-{os.getpid()}"  # short: Ray's socket paths have a length limit
    prometheus, url = start_prometheus(tmp_path, system_temp / "ray")
    name = "dashboardlive"
    command = [sys.executable, str(ROOT / "tune" / "search.py"), "--smoke-test", "--teacher", str(digits_teacher[0]),
               "--storage-path", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--name", name,
               "--num-samples", "1", "--epochs", "8", "--workers-per-trial", "2", "--cpus-per-worker", "0.5",
               "--driver-cpus", "0.5", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    # Ray's metrics agent takes application metrics from the workers every metrics_report_interval_ms.
    # RAY_TMPDIR: the search's local Ray keeps its session (and discovery file) under system_temp/ray.
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", "RAY_TMPDIR": str(system_temp)}
    pending = {q.expr: q for q in build_dashboard.queries() if q.scope != build_dashboard.GPU}
    seen: dict[str, list[dict]] = {}
    search = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              env=env)
    try:
        deadline = time.monotonic() + 240  # a guard against hangs, not a speed target
        while pending and search.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            for expr in list(pending):
                series = query(url, dashboard_expr(expr, name))
                if series:
                    seen[expr] = series
                if complete(expr, series):
                    del pending[expr]
        output = search.communicate(timeout=240)[0]
        targets = [(t["scrapeUrl"], t["health"], t["lastError"])
                   for t in get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]]
    finally:
        for process in (search, prometheus):
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(system_temp, ignore_errors=True)
    assert search.returncode == 0, output[-3000:]
    assert not pending, (f"no series (or not every rank's) while the search ran for: {sorted(pending)}; "
                         f"targets {targets}\n{output[-2000:]}")
    for expr, series in seen.items():
        scope = next(q.scope for q in build_dashboard.queries() if q.expr == expr)
        for one in series:
            labels = one["metric"]
            if scope == build_dashboard.WORKER:
                assert labels["search"] == name and labels["trial"] and labels["rank"] in ("0", "1"), (expr, labels)
            elif scope == build_dashboard.SEARCH_LEVEL:
                assert labels["search"] == name, (expr, labels)
    ranks = {s["metric"]["rank"] for s in seen[next(e for e in seen if SPEED_METRIC in e)]}
    assert ranks == {"0", "1"}, "every worker exports its own speed"


def test_the_readme_lists_every_exported_metric():
    readme = (DASHBOARDS / "README.md").read_text()
    assert [name for name in EXPORTED if f"`{name}`" not in readme] == []
