"""What the search tells its user: a line per trial event while it runs, then results.parquet and
a final table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune.experimental.output import AirVerbosity
from ray.tune.experimental.output import ProgressReporter as TuneProgressReporter

from lrra.distributed import RANK0_NODE
from lrra.library_hooks import tune_reporters_keep_their_start_time
from lrra.live_metrics import search_metrics
from lrra.metric_names import BEST_VALIDATION_METRIC, DIVERGED_KEY, VALIDATION_METRIC
from tune.live_view import COMPLETED as COMPLETED_STATE
from tune.live_view import FAILED, STOPPED, TrialBoard, view_for
from tune.plan import SearchPlan, filesystem
from tune.search_tracking import LoggedStudent
from tune.study import (
    ALREADY_FINISHED,
    COMPLETED,
    DIVERGED,
    EARLY_STOPPED,
    EPOCHS_DONE,
    ERROR,
    OPTUNA_NUMBER,
    TIME_BUDGET,
)


def format_knobs(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items() if k != OPTUNA_NUMBER)


def config_key(config: dict[str, Any]) -> str:
    """A trial config as a string that identifies it (a dict is not hashable)."""
    return json.dumps(config, sort_keys=True, default=str)


class ProgressLines(TuneProgressReporter):
    """Shows each trial's start, epochs and end (driver side) and exports the search's live metrics.

    A Tune progress reporter, not a plain callback: Tune gives the experiment's opening to the
    first reporter among the callbacks, and Ray's own one prints a boxed table and a TensorBoard
    hint to stdout there. Its other output is off at verbose=0. What it shows goes to a
    tune/live_view.py board: a refreshing table on a terminal, plain lines (no colours) otherwise.
    """

    # A class default, so that a search saved by a version without the budget warning still resumes
    # (Tune unpickles this callback from the experiment state).
    time_budget_s: float | None = None

    def __init__(self, epochs: int, num_samples: int, search: str = "",
                 trial_names: dict[str, str] | None = None, time_budget_s: float | None = None) -> None:
        """``trial_names``: a name per trial config (keyed by ``config_key``) for trials that have no
        Optuna number, such as a comparison's variant/seed trials. ``time_budget_s``: the search's
        budget, for the warning that it will cut trials (tune/budget_forecast.py)."""
        super().__init__(verbosity=AirVerbosity.SILENT)
        self.epochs = epochs
        self.time_budget_s = time_budget_s
        self.num_samples = num_samples
        self.search = search
        self.trial_names = trial_names or {}
        self.board: TrialBoard | None = None

    def _name(self, trial) -> Any:
        return trial.config.get(OPTUNA_NUMBER, self.trial_names.get(config_key(trial.config), "?"))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; a live display does not pickle.
        return {**self.__dict__, "board": None}

    def _board(self) -> TrialBoard:
        if self.board is None:
            self.board = TrialBoard(self.epochs, view_for(), self.time_budget_s)
        return self.board

    def setup(self, **info) -> None:
        # Before Ray's own reporter, which Tune sets up after this one (lrra/library_hooks.py).
        tune_reporters_keep_their_start_time()
        # also when a resumed search unpickles this callback
        self.board = TrialBoard(self.epochs, view_for(), self.time_budget_s)

    def experiment_started(self, **info) -> None:
        """The search prints its own opening lines (tune/search.py)."""

    def print_heartbeat(self, trials, *args, **kwargs) -> None:
        """No periodic status table: the board shows every trial event."""

    def _export(self) -> None:
        if self.search:
            board = self._board()
            search_metrics(self.search).export(board.states(), board.best_accuracy())

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._board().started(trial.trial_id, self._name(trial),
                              f"started ({len(trials)}/{self.num_samples}): {format_knobs(trial.config)}")
        self._export()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if ALREADY_FINISHED in result or DIVERGED_KEY in result or VALIDATION_METRIC not in result:
            return  # not a new epoch: on_trial_complete says what it is
        self._board().epoch(trial.trial_id, self._name(trial), result[EPOCHS_DONE],
                            result[VALIDATION_METRIC], result[BEST_VALIDATION_METRIC],
                            result.get("perf/student_steps_per_s"), result.get(RANK0_NODE, ""))
        self._export()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        self._board().ended(trial.trial_id, self._name(trial), end_state(result, self.epochs),
                            ending(result, self.epochs), result.get(BEST_VALIDATION_METRIC))
        self._export()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._board().ended(trial.trial_id, self._name(trial), FAILED,
                            f"failed: {trial.error_file or 'see the Ray logs'}")
        self._export()

    def on_experiment_end(self, trials, **info) -> None:
        if self.board is not None:
            self.board.close()


def end_state(result: dict[str, Any], epochs: int) -> str:
    """The board's state of a trial that ended: completed, stopped (ASHA, budget) or failed (diverged)."""
    if result.get(DIVERGED_KEY):
        return FAILED
    return COMPLETED_STATE if result.get(EPOCHS_DONE, 0) >= epochs or ALREADY_FINISHED in result else STOPPED


def ending(result: dict[str, Any], epochs: int) -> str:
    """How a trial ended, from its last result, for its last progress line."""
    done = result.get(EPOCHS_DONE, 0)
    best = result.get(BEST_VALIDATION_METRIC)
    best_text = f"best acc {best:.4f}" if best is not None else "no accuracy yet"
    if ALREADY_FINISHED in result:
        return f"had already ended before the search was resumed ({result[ALREADY_FINISHED]}); {best_text}"
    if result.get(DIVERGED_KEY):
        return f"{DIVERGED} at epoch {done + 1} (non-finite loss), {best_text}"
    how = COMPLETED if done >= epochs else f"{EARLY_STOPPED} by ASHA"
    return f"{how} after {done} epoch(s), {best_text}"


def write_parquet(rows: list[dict[str, Any]], path: str) -> None:
    """One row per trial, readable with pyarrow.parquet.read_table(path)."""
    fs, target = filesystem(path)
    pq.write_table(pa.Table.from_pylist(rows), target, filesystem=fs)


def best_row(rows: list[dict[str, Any]], best_student: LoggedStudent | None = None) -> dict[str, Any] | None:
    """The row of the search's best student: the trial of ``best_student`` (the best student the
    trials logged, a trial cut by the budget included: the one the search registers) when it has
    one, else the best completed trial by validation, else the best of any trial."""
    if best_student is not None:
        row = next((r for r in rows if r["tune_trial_id"] == best_student.trial_id), None)
        if row is not None:
            return {**row, "best_val_acc": best_student.val_accuracy, "test_acc": best_student.test_accuracy}
    scored = [r for r in rows if r["best_val_acc"] is not None]
    completed = [r for r in scored if r["stop_reason"] == COMPLETED]
    return max(completed or scored, key=lambda r: r["best_val_acc"], default=None)


def best_student_file(row: dict[str, Any]) -> str:
    """The best student of a completed trial, written by its last checkpoint."""
    files = sorted(Path(row["train_run"]).glob("checkpoint_*/best_student.pt"))
    return str(files[-1]) if files else f"{row['train_run']} (checkpoints)"


def print_summary(rows: list[dict[str, Any]], plan: SearchPlan, wall_s: float, runs_view: str = "",
                  best_student: LoggedStudent | None = None) -> None:
    """The final table; ``best_student``: the best logged student (tune/search_tracking.py), so that
    the best student named here is the one the search registers."""
    count = {reason: sum(r["stop_reason"] == reason for r in rows)
             for reason in (COMPLETED, EARLY_STOPPED, TIME_BUDGET, DIVERGED, ERROR)}
    best = best_row(rows, best_student)
    lines = [
        "",
        f"search {plan.name}: {len(rows)} trial(s) in {wall_s / 60:.1f} min",
        f"  completed {count[COMPLETED]}, stopped early by ASHA {count[EARLY_STOPPED]}, "
        f"cut by the time budget {count[TIME_BUDGET]}, diverged {count[DIVERGED]}, failed {count[ERROR]}",
    ]
    if best is not None:
        lines += [
            f"  best student           validation {best['best_val_acc']:.4f}  (trial {best['optuna_trial_number']}, "
            f"{best['stop_reason']}, final {best['final_val_acc']:.4f} after {best['epochs']} epochs)",
            "  its test accuracy      " + (f"{best['test_acc']:.4f}" if best["test_acc"] is not None
                                         else "not scored (the trial did not complete)"),
            f"  best configuration     {format_knobs({k: best[k] for k in plan.space})}",
        ]
        if best["stop_reason"] == COMPLETED:
            lines.append(f"  best student file      {best_student_file(best)}")
        if best_student is not None and best["tune_trial_id"] == best_student.trial_id:
            lines.append(f"  best student model     {best_student.model_uri}")  # a cut trial's is only there
    lines += [
        f"  experiment             {plan.experiment_path}",
        f"  results (one row/trial) {plan.results_path}",
        f"  Optuna study           {plan.study_name!r} in {plan.study_storage}",
        "",
        "look at it with (Prometheus records only while it runs, so start it before the next search):",
        *viewing_commands(plan, runs_view),
    ]
    print("\n".join(lines), flush=True)


DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"


def viewing_commands(plan: SearchPlan, runs_view: str = "") -> list[str]:
    """The exact commands that open this search in Optuna's dashboard, MLflow's UI and Grafana;
    ``runs_view``: the MLflow UI's path to the search's runs (#/experiments/ID/runs)."""
    tracking = plan.tracking_uri
    if tracking.startswith(("http://", "https://")):
        mlflow = f"open {tracking.rstrip('/')}/{runs_view} (the tracking server)"
    else:
        mlflow = f"mlflow ui --backend-store-uri {tracking}"
        if runs_view:
            mlflow += f"\n                         then http://127.0.0.1:5000/{runs_view}"
    provisioning = DASHBOARDS / "grafana" / "provisioning"
    return [
        f"  Optuna dashboard       optuna-dashboard {plan.study_storage}",
        f"  MLflow UI              {mlflow}",
        f"  Prometheus             prometheus --config.file={DASHBOARDS / 'prometheus.yml'}",
        f"  Grafana                LRRA_DASHBOARDS_DIR={DASHBOARDS} LRRA_PROMETHEUS_URL=http://localhost:9090 "
        f"grafana-server --homepath /usr/share/grafana cfg:paths.provisioning={provisioning}",
        f"                         then http://localhost:3000/d/lrra-search?var-search={plan.name} "
        f"(see {DASHBOARDS / 'README.md'})",
    ]
