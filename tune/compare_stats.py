"""The numbers of a seeded comparison: per trial, per variant over seeds, and paired differences.

Per trial (one variant, one seed), from its validation accuracy after each epoch a_1 .. a_E:

- ``final_val_acc`` a_E, ``best_val_acc`` max a_t, ``mean_val_acc`` the mean of a_t;
- ``test_acc``: the test accuracy of the student validation chose (a completed trial's only);
- ``forgetting``: the mean over epochs of (max_{s<=t} a_s - a_t), the accuracy a run has lost
  since its best epoch so far, averaged over the run. 0 for a run that never drops; a run that
  peaks early and decays scores high. Memory and retention are meant to keep it low;
- ``wall_s``: the trial's wall time as Tune measured it (its function's start to its last report).

Per variant, each metric's mean and sample standard deviation over seeds ("spread").

Against a reference variant, each metric's difference is paired by seed (the same seed gives
both variants the same initial student and generator): the **paired t-test** over seeds
(``scipy.stats.ttest_rel``) gives a two-sided p-value and the 95 % confidence interval of the mean
paired difference. A difference "exceeds the seed spread" when that interval excludes 0
(p < 0.05). With n seeds the test has n - 1 degrees of freedom, so 2 seeds rarely show anything
and 3 only large, consistent differences: more seeds make it sharper.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

METRICS = ("final_val_acc", "best_val_acc", "mean_val_acc", "test_acc", "forgetting", "wall_s")
METRIC_LABELS = {"final_val_acc": "final val", "best_val_acc": "best val", "mean_val_acc": "mean val",
                 "test_acc": "test (best)", "forgetting": "forgetting", "wall_s": "wall s"}
COMPARED = METRICS[:-1]  # wall time depends on the machine's load, not on the seed: not tested
TEST_NAME = "paired t-test over seeds (scipy.stats.ttest_rel), 95% CI of the mean paired difference"
CONFIDENCE = 0.95


def trial_metrics(accuracies: list[float]) -> dict[str, float | None]:
    """final, best and mean validation accuracy and the forgetting measure of one run's curve."""
    if not accuracies:
        return {"final_val_acc": None, "best_val_acc": None, "mean_val_acc": None, "forgetting": None}
    accs = np.asarray(accuracies, dtype=float)
    return {"final_val_acc": float(accs[-1]), "best_val_acc": float(accs.max()), "mean_val_acc": float(accs.mean()),
            "forgetting": float(np.mean(np.maximum.accumulate(accs) - accs))}


def spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the values present; the deviation is 0 for one value."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else 0.0


def paired_difference(values: dict[int, float | None], reference: dict[int, float | None]) -> dict[str, Any]:
    """The paired t-test of ``values`` - ``reference`` over the seeds both have (seed -> value).

    Returns n, the mean difference, its 95 % CI (low, high), the p-value and ``exceeds`` (the CI
    excludes 0). With fewer than 2 pairs there is no test (None). Differences that are all equal
    have no spread: the CI is that single value, and it exceeds the spread unless it is 0.
    """
    seeds = sorted(s for s in values if values[s] is not None and reference.get(s) is not None)
    diffs = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    result: dict[str, Any] = {"n": len(seeds), "diff": float(diffs.mean()) if len(seeds) else None,
                              "ci_low": None, "ci_high": None, "p": None, "exceeds": None}
    if len(seeds) < 2:
        return result
    if np.ptp(diffs) <= 1e-12:  # equal up to rounding: the t statistic would divide by ~0
        mean = float(diffs.mean())
        exceeds = abs(mean) > 1e-12
        result.update(ci_low=mean, ci_high=mean, p=0.0 if exceeds else 1.0, exceeds=exceeds)
        return result
    test = stats.ttest_rel([values[s] for s in seeds], [reference[s] for s in seeds])
    interval = test.confidence_interval(CONFIDENCE)
    result.update(ci_low=float(interval.low), ci_high=float(interval.high), p=float(test.pvalue),
                  exceeds=bool(interval.low > 0 or interval.high < 0))
    return result


def summarise(rows: list[dict[str, Any]], variants: list[str], reference: str) -> list[dict[str, Any]]:
    """One row per variant: n seeds, each metric's mean and spread, and (not for the reference) its
    paired difference to the reference, per compared metric, as ``<metric>_diff``, ``_ci_low``,
    ``_ci_high``, ``_p``, ``_exceeds`` (None in the reference's own row)."""
    by_variant = {name: {row["seed"]: row for row in rows if row["variant"] == name} for name in variants}
    summary = []
    for name in variants:
        trials = by_variant[name]
        entry: dict[str, Any] = {"variant": name, "seeds": len(trials), "reference": reference}
        for metric in METRICS:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = spread([t[metric] for t in trials.values()])
        for metric in COMPARED:  # the reference gets the same columns, empty: every row has one schema
            test = paired_difference({s: t[metric] for s, t in trials.items()} if name != reference else {},
                                     {s: t[metric] for s, t in by_variant[reference].items()})
            entry.update({f"{metric}_{key}": value for key, value in test.items() if key != "n"})
        summary.append(entry)
    return summary
