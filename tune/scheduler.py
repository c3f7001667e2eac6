"""ASHA that never stops the search's baseline trials.

A search begins with its baselines (tune/space.py::baseline_points): the preset as it is, the run a
user gets without the search, then its counterparts, which answer whether a faster or a slower
generator (or, for a preset with a memory, no memory) does better on this teacher. ASHA still
records them at every rung, so the other trials are measured against them, but they run to their
last epoch (or until the time budget): the champion is never worse on validation than any baseline
run in full, and a noisy early rung cannot throw a baseline away.

Why, measured on the preset and its counterpart (README, default search): at the first rung the two
are a coin toss. In the default MNIST search at 30 epochs ASHA stopped the memory counterpart at
epoch 3 (85.98 % validation against the preset's 86.96 %), though run in full it is the better of
the two (96.80 % against 96.50 %); at 15 epochs it had stopped the preset the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from lrra.library_hooks import asha_uncount_stop
from tune.study import OPTUNA_NUMBER


def baseline_numbers(baselines: int) -> range:
    """Optuna numbers of the baseline trials: points to evaluate are enqueued, and numbered, first."""
    return range(baselines)


class BaselineSparingASHA(ASHAScheduler):
    """ASHA, except that trials whose Optuna number is in ``spared`` are never stopped early."""

    def __init__(self, *, spared: Collection[int], **asha: Any):
        super().__init__(**asha)
        self._spared = frozenset(spared)

    def is_spared(self, trial: Trial) -> bool:
        return trial.config.get(OPTUNA_NUMBER) in self._spared

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        if decision == TrialScheduler.STOP and self.is_spared(trial):
            asha_uncount_stop(self)  # ASHA counted it as stopped
            return TrialScheduler.CONTINUE
        return decision
