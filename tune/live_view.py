"""The search driver's view of its trials: a refreshing table on a terminal, plain lines elsewhere.

``TrialBoard`` holds one row per trial (state, epoch, accuracy, best, steps/s, node) and is fed
trial events by tune/report.py; it needs no Ray, so a test can feed it a fake stream. On a
terminal (stderr is a TTY) ``TableView`` redraws one compact table in place with ``rich``; in CI
or a log file ``LineView`` prints one plain line per event, as the search always has.
"""

from __future__ import annotations

import atexit
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from lrra import logs
from tune.budget_forecast import BudgetForecast

RUNNING, COMPLETED, STOPPED, FAILED = "running", "completed", "stopped", "failed"


@dataclass
class TrialRow:
    number: int | str
    trial_id: str
    state: str = RUNNING
    epoch: int = 0
    acc: float | None = None
    best: float | None = None
    steps_per_s: float | None = None
    node: str = ""


class TrialBoard:
    """The trials' latest state, and where each event is shown."""

    def __init__(self, epochs: int, view: LineView | TableView, time_budget_s: float | None = None) -> None:
        self.epochs = epochs
        self.view = view
        self.rows: dict[str, TrialRow] = {}
        self.notes: list[str] = []  # lines that stay in view (the table keeps them under itself)
        self.forecast = BudgetForecast(epochs, time_budget_s)
        self.start = time.monotonic()

    def states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def best_accuracy(self) -> float | None:
        return max((r.best for r in self.rows.values() if r.best is not None), default=None)

    def _row(self, trial_id: str, number: int | str) -> TrialRow:
        return self.rows.setdefault(trial_id, TrialRow(number, trial_id))

    def _line(self, row: TrialRow, message: str) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
        return f"[{minutes:3d}:{seconds:02d}] trial {row.number} ({row.trial_id}) {message}"

    def _show(self, row: TrialRow, message: str) -> None:
        self.view.show(self, self._line(row, message))

    def started(self, trial_id: str, number: int | str, message: str) -> None:
        row = self._row(trial_id, number)
        row.state = RUNNING
        self._show(row, message)

    def epoch(self, trial_id: str, number: int | str, epoch: int, acc: float, best: float,
              steps_per_s: float | None = None, node: str = "") -> None:
        row = self._row(trial_id, number)
        row.state, row.epoch, row.acc, row.best = RUNNING, epoch, acc, best
        row.steps_per_s, row.node = steps_per_s, node or row.node
        self._show(row, f"epoch {epoch}/{self.epochs}  acc {acc:.4f}  best {best:.4f}")
        warning = self.forecast.epoch(trial_id, epoch, time.monotonic() - self.start)
        if warning:
            self.notes.append(self._line(row, warning))
            self.view.show(self, self.notes[-1])

    def ended(self, trial_id: str, number: int | str, state: str, message: str, best: float | None = None) -> None:
        row = self._row(trial_id, number)
        row.state = state
        row.best = best if best is not None else row.best
        self.forecast.ended()
        self._show(row, message)

    def close(self) -> None:
        self.view.close()


class LineView:
    """One plain line per event, through the search's logger (or on ``stream``): no colours, the same
    on a terminal and in a log file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def show(self, board: TrialBoard, line: str) -> None:
        if self.stream is None:
            logs.search.info(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class TableView:
    """A compact table of every trial, redrawn in place at each event (rich's Live display)."""

    COLUMNS = ("trial", "state", "epoch", "val acc", "best", "steps/s", "node")

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream or sys.stderr)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.live.start()
        atexit.register(self.close)  # an interrupted search gives the terminal its cursor back too

    def render(self, board: TrialBoard, last: str):
        from rich.table import Table

        caption = "\n".join(board.notes + ([] if last in board.notes else [last]))
        table = Table(title=f"search trials ({board.epochs} epochs each)", caption=caption, caption_justify="left")
        for column in self.COLUMNS:
            table.add_column(column, justify="left" if column in ("trial", "state", "node") else "right")
        for row in board.rows.values():
            table.add_row(str(row.number), row.state, f"{row.epoch}/{board.epochs}", _fmt(row.acc, ".4f"),
                          _fmt(row.best, ".4f"), _fmt(row.steps_per_s, ".1f"), row.node)
        return table

    def show(self, board: TrialBoard, line: str) -> None:
        self.live.update(self.render(board, line), refresh=True)

    def close(self) -> None:
        self.live.stop()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def view_for(stream: TextIO | None = None) -> LineView | TableView:
    """The table on a terminal, plain lines otherwise (CI, a pipe, a log file)."""
    target = stream or sys.stderr
    return TableView(stream) if target.isatty() else LineView(stream)
