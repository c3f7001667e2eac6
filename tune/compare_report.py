"""What a comparison shows: the terminal table, the accuracy-curve figure, and its MLflow parent run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from lrra.tracking import TAG_KIND, TAG_TRIAL_ID, ensure_experiment, log_params, new_run
from tune.compare_stats import COMPARED, METRIC_LABELS, METRICS, TEST_NAME
from tune.search_tracking import child_runs

COMPARE_EXPERIMENT = "lrra-compare"
TAG_VARIANT = "lrra.variant"
TAG_SEED = "lrra.seed"


def _cell(mean: float | None, std: float | None, digits: int) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(summary: list[dict[str, Any]], reference: str) -> str:
    """Per variant, mean ± spread over seeds of every metric; then each difference to the reference."""
    width = max(len(entry["variant"]) for entry in summary) + 2
    header = f"{'variant':<{width}}{'seeds':>5}  " + "".join(f"{METRIC_LABELS[m]:>17}" for m in METRICS)
    lines = [header]
    for entry in summary:
        cells = "".join(f"{_cell(entry[f'{m}_mean'], entry[f'{m}_std'], 1 if m == 'wall_s' else 4):>17}"
                        for m in METRICS)
        lines.append(f"{entry['variant']:<{width}}{entry['seeds']:>5}  {cells}")
    lines += ["", f"difference to {reference} ({TEST_NAME}):"]
    for entry in summary:
        if entry["variant"] == reference:
            continue
        for metric in COMPARED:
            diff, low, high = entry[f"{metric}_diff"], entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
            if diff is None:
                text = "no paired seeds"
            elif low is None:
                text = f"{diff:+.4f}  (one paired seed: no test)"
            else:
                verdict = "EXCEEDS the seed spread" if entry[f"{metric}_exceeds"] else "within the seed spread"
                text = f"{diff:+.4f}  CI [{low:+.4f}, {high:+.4f}]  p={entry[f'{metric}_p']:.3f}  {verdict}"
            lines.append(f"  {entry['variant']:<{width}}{METRIC_LABELS[metric]:<12}{text}")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], variants: list[str], path: Path, title: str) -> None:
    """Validation accuracy per epoch: each variant's mean over seeds, with a band from the lowest
    to the highest seed. Only the epochs every seed of a variant reached are drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name in variants:
        curves = [row["val_accs"] for row in rows if row["variant"] == name and row["val_accs"]]
        if not curves:
            continue
        length = min(len(curve) for curve in curves)
        accs = np.array([curve[:length] for curve in curves])
        epochs = np.arange(1, length + 1)
        line, = axes.plot(epochs, accs.mean(axis=0), marker="o", label=f"{name} ({len(curves)} seeds)")
        axes.fill_between(epochs, accs.min(axis=0), accs.max(axis=0), color=line.get_color(), alpha=0.2)
    axes.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    axes.grid(alpha=0.3)
    axes.legend(title="mean; band: min–max over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def open_comparison_run(client: MlflowClient, name: str, params: dict[str, Any]) -> str:
    """The comparison's parent run; each trial's child run is opened under it by run_trial."""
    run_id = new_run(client, ensure_experiment(client, COMPARE_EXPERIMENT), {TAG_KIND: "comparison"}, name)
    log_params(client, run_id, params)
    return run_id


def log_comparison(client: MlflowClient, run_id: str, rows: list[dict[str, Any]],
                   summary: list[dict[str, Any]], files: list[Path]) -> None:
    """Tag each trial's child run with its variant and seed; log the per-variant means and spreads as
    the parent's metrics (``<variant>/<metric>_mean``, ``_std``) and ``files`` as its artifacts."""
    by_trial = {row["tune_trial_id"]: row for row in rows}
    for run in child_runs(client, run_id):
        row = by_trial.get(run.data.tags.get(TAG_TRIAL_ID))
        if row is not None:
            client.set_tag(run.info.run_id, TAG_VARIANT, row["variant"])
            client.set_tag(run.info.run_id, TAG_SEED, str(row["seed"]))
    now = int(time.time() * 1000)
    metrics = [Metric(f"{entry['variant']}/{key}", float(entry[key]), now, 0)
               for entry in summary for key in entry
               if key.endswith(("_mean", "_std")) and entry[key] is not None]
    client.log_batch(run_id, metrics=metrics)
    for path in files:
        client.log_artifact(run_id, str(path), "comparison")

