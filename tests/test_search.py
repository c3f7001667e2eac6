"""tune/search.py end to end: real Ray, a real Optuna SQLite study, the digits preset, tiny budgets.

Searches run as subprocesses (``python tune/search.py ...``), as a user runs them: each starts
a private local Ray that ends with it. Bad input is checked through ``main()`` in this process,
where it must fail before Ray starts.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tests.search_records import assert_study_matches_results, results_of, study_of
from tune import search

ROOT = Path(__file__).resolve().parent.parent

SEARCH = ROOT / "tune" / "search.py"


# ----------------------------------------------------------------------------------------
# One uninterrupted smoke search: the study, the parquet file and ASHA.


@pytest.fixture
def smoke(finished_smoke_search):
    """(the search's completed process, its storage path) of the session's smoke search (conftest)."""
    return finished_smoke_search.done, finished_smoke_search.storage


@pytest.mark.slow
def test_smoke_search_fills_the_study_and_the_results_file(smoke):
    done, storage = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results_of(storage, "smoke")
    assert_study_matches_results(study_of(storage, "smoke"), rows, trials=3)
    assert {row["stop_reason"] for row in rows} <= {"completed", "early-stopped"}
    assert "best student           validation" in done.stdout and "its test accuracy" in done.stdout
    assert str(storage / "smoke" / "results.parquet") in done.stdout


@pytest.mark.slow
def test_smoke_search_output_is_plain_progress_lines(smoke):
    """Read as a log file (not a TTY): no Ray Tune tables or TensorBoard hint, no colour codes."""
    done, _ = smoke
    assert "Configuration for experiment" not in done.stdout and "tensorboard" not in done.stdout.lower()
    assert "\x1b[" not in done.stdout + done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert any(" trial 0 (" in line and "completed after 3 epoch(s)" in line for line in progress)
    assert not any("INFO" in line for line in done.stderr.splitlines())  # Optuna's and MLflow's INFO lines


@pytest.mark.slow
def test_asha_stops_the_useless_trial_at_its_first_rung(smoke):
    done, storage = smoke
    rows = {row["optuna_trial_number"]: row for row in results_of(storage, "smoke")}
    # The preset's point first (it has no memory), the same with LRRA's retention second, then --point.
    preset_trial, retention_trial, useless_trial = rows[0], rows[1], rows[2]
    assert (preset_trial["memory_capacity"], retention_trial["memory_capacity"]) == (0, 8)  # the digits space's most
    assert preset_trial["stop_reason"] == "completed" and preset_trial["epochs"] == 3
    assert useless_trial["student_lr"] == pytest.approx(1e-5)
    assert useless_trial["stop_reason"] == "early-stopped" and useless_trial["state"] == "PRUNED"
    assert useless_trial["epochs"] == 1
    assert useless_trial["best_val_acc"] < preset_trial["best_val_acc"]


# ----------------------------------------------------------------------------------------
# Bad input: one clear message, exit 2, nothing started.


@pytest.fixture
def bad_input(tmp_path, capsys):
    """Runs main() on arguments that must fail fast; returns its stderr."""

    def run(*args: str) -> str:
        started = time.monotonic()
        code = search.main(["--storage-path", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), *args])
        assert code == 2
        assert time.monotonic() - started < 10
        assert not ray.is_initialized() and not (tmp_path / "runs").exists()
        return capsys.readouterr().err

    return run


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "digits", "--bound", "meta_lr=0.5:0.01"], "inverted bounds (low 0.5 > high 0.01)"),
    (["--preset", "digits", "--bound", "meta_lr=0.1:0.1"], "empty range"),
    (["--preset", "digits", "--bound", "kd_steps=4:"], "expected LOW:HIGH"),
    (["--preset", "digits", "--bound", "retention_order=0,3"], "config field 'retention_order' = 3 is invalid"),
    (["--preset", "digits", "--bound", "epochs=1:5"], "--bound epochs: not a searched knob"),
    (["--preset", "digits", "--time-budget", "soon"], "--time-budget soon"),
    (["--preset", "digits", "--max-concurrent-trials", "0"], "--max-concurrent-trials 0: must be >= 1"),
    (["--preset", "digits", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: nothing answers there"),
])
def test_bad_input_fails_before_anything_starts(bad_input, args, message):
    assert message in bad_input(*args)


def test_a_teacher_of_another_preset_is_refused(bad_input, digits_teacher):
    err = bad_input("--preset", "mnist", "--teacher", str(digits_teacher[0]))
    assert "has image_size=8 but the config has image_size=32" in err


def test_a_space_file_with_bad_bounds_is_refused(bad_input, tmp_path):
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps({"student_lr": [0.3, 0.1]}))
    assert "inverted bounds" in bad_input("--preset", "digits", "--space-file", str(space_file))


@pytest.mark.slow
def test_unwritable_storage_exits_2_from_the_command_line(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SEARCH), "--preset", "digits", "--storage-path", str(a_file / "runs")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert f"--storage {a_file / 'runs'}: {a_file} is a file" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30
