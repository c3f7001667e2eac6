"""The search's trial view (tune/live_view.py): a table redrawn in place in a real pseudo-terminal,
plain lines when stderr is a pipe. A fake stream of trial events drives it; no Ray is needed."""

import os
import pickle
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent

# Two trials: both start, each reports 3 epochs, then one completes and the other is stopped early.
FAKE_SEARCH = """
import sys, time
from tune.live_view import COMPLETED, STOPPED, TrialBoard, view_for
board = TrialBoard(3, view_for())
board.started("t0", 0, "started (1/2): meta_lr=0.1")
board.started("t1", 1, "started (2/2): meta_lr=0.5")
for epoch in (1, 2, 3):
    board.epoch("t0", 0, epoch, 0.5 + epoch / 10, 0.5 + epoch / 10, 42.5, "10.0.0.7")
    board.epoch("t1", 1, epoch, 0.2, 0.25, 40.0, "10.0.0.8")
    time.sleep(0.05)
board.ended("t0", 0, COMPLETED, "completed after 3 epoch(s), best acc 0.8000")
board.ended("t1", 1, STOPPED, "stopped early by ASHA after 3 epoch(s), best acc 0.2500")
board.close()
"""
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def table_row(*cells: str) -> str:
    return r"\s*│\s*".join(re.escape(cell) for cell in cells)


def run_in_pty(code: str) -> str:
    """Run ``python -c code`` with stdin, stdout and stderr on a real pseudo-terminal; return what it drew."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stderr is the terminal
        os.chdir(ROOT)
        os.environ.update(COLUMNS="100", LINES="40", TERM="xterm-256color")
        os.execv(sys.executable, [sys.executable, "-c", code])
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_table_redrawn_in_place():
    drawn = run_in_pty(FAKE_SEARCH)
    # rich's Live display moves the cursor up over the previous table before each redraw.
    redraws = len(re.findall(r"\x1b\[\d*A", drawn))
    assert redraws >= 8, f"{redraws} redraws: {drawn[-1500:]!r}"
    plain = ESCAPE.sub("", drawn)
    assert all(column in plain for column in ("trial", "state", "epoch", "val acc", "best", "steps/s", "node"))
    last = plain[plain.rindex("search trials"):]  # the final table
    assert re.search(table_row("0", "completed", "3/3", "0.8000", "0.8000", "42.5", "10.0.0.7"), last), last
    assert re.search(table_row("1", "stopped", "3/3", "0.2000", "0.2500", "40.0", "10.0.0.8"), last), last
    assert "stopped early by ASHA" in last  # the latest event, under the table
    assert "epoch 1/3" not in last, "earlier events are not left on the screen, line after line"


def test_a_pipe_keeps_one_plain_line_per_event():
    done = subprocess.run([sys.executable, "-c", FAKE_SEARCH], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 10 and "\x1b" not in done.stderr
    assert re.fullmatch(r"\[\s*0:\d\d\] trial 0 \(t0\) epoch 2/3  acc 0\.7000  best 0\.7000", lines[4]), lines[4]
    assert lines[-1].endswith("trial 1 (t1) stopped early by ASHA after 3 epoch(s), best acc 0.2500")


def test_tune_trial_events_fill_the_board_with_state_epoch_speed_and_node():
    from lrra.distributed import RANK0_NODE
    from lrra.metric_names import DIVERGED_KEY, VALIDATION_METRIC
    from tune.report import ProgressLines
    from tune.study import EPOCHS_DONE, OPTUNA_NUMBER

    reporter = ProgressLines(epochs=3, num_samples=2)  # no search name: nothing exported to Ray
    reporter.setup()
    trials = [SimpleNamespace(trial_id=f"t{n}", config={OPTUNA_NUMBER: n, "meta_lr": 0.1}, error_file=None,
                              last_result={}) for n in (0, 1)]
    for trial in trials:
        reporter.on_trial_start(0, trials, trial)
    epoch = {EPOCHS_DONE: 3, VALIDATION_METRIC: 0.7, "val/best_student_acc": 0.8, "perf/student_steps_per_s": 12.5,
             RANK0_NODE: "10.0.0.9"}
    reporter.on_trial_result(0, trials, trials[0], epoch)
    trials[0].last_result = epoch
    trials[1].last_result = {**epoch, EPOCHS_DONE: 1, DIVERGED_KEY: 1}
    for trial in trials:
        reporter.on_trial_complete(0, trials, trial)
    rows = reporter.board.rows
    assert (rows["t0"].state, rows["t0"].epoch, rows["t0"].steps_per_s, rows["t0"].node) == ("completed", 3, 12.5,
                                                                                            "10.0.0.9")
    assert rows["t1"].state == "failed"
    assert reporter.board.states() == {"completed": 1, "failed": 1} and reporter.board.best_accuracy() == 0.8
    assert pickle.loads(pickle.dumps(reporter)).board is None  # Tune pickles its callbacks
    saved_before_the_budget_warning = pickle.loads(pickle.dumps(reporter))
    del saved_before_the_budget_warning.__dict__["time_budget_s"]
    saved_before_the_budget_warning.setup()  # a resumed older search
    assert saved_before_the_budget_warning.board.forecast.time_budget_s is None
