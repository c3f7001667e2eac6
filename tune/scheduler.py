"""ASHA that never stops the preset's own trial.

The first trial of a search runs the preset's configuration as it is
(tune/space.py::baseline_points), the one a user gets without the search. ASHA still records
that trial's accuracy at every rung, so the other trials are measured against it, but it always
runs to its last epoch (or until the time budget): the search's champion is never worse on
validation than that default run, and a noisy early rung cannot throw the default away.

What it costs and buys, measured (README, default search): in the default MNIST search ASHA
had stopped the preset's trial at its first rung (epoch 3, 86.96 % validation, just under the
memory counterpart). Spared, it ran its 15 epochs to 96.02 % validation, under the counterpart's
96.56 %: the same champion, the same 8 trials, one trial's epochs spent on the guarantee.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tune.study import OPTUNA_NUMBER

PRESET_TRIAL_NUMBER = 0  # the study's first trial is the first point evaluated: the preset's own


class PresetSparingASHA(ASHAScheduler):
    """ASHA, except that the trial with Optuna number ``spared`` (if any) is never stopped early."""

    def __init__(self, *, spared: int | None, **asha: Any):
        super().__init__(**asha)
        self._spared = spared

    def is_spared(self, trial: Trial) -> bool:
        return self._spared is not None and trial.config.get(OPTUNA_NUMBER) == self._spared

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        if decision == TrialScheduler.STOP and self.is_spared(trial):
            self._num_stopped -= 1  # ASHA counted it as stopped
            return TrialScheduler.CONTINUE
        return decision
