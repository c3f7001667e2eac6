"""Says early, once, when a search's time budget will cut its trials before their last epoch.

A trial cut by the budget keeps its best epoch so far, but it never reaches the end of its
learning-rate schedule, where the last points are made. A large teacher (a ResNet-18 on a 2-core
CPU: ~35 s an epoch, two trials at a time) can leave every trial at a third of its epochs in the
default 10 minutes. From a trial's second epoch on, the time between its epochs says when its last
epoch would end; when that is after the budget, the search says so, with the budget that would
let it finish. Only the first trials, those that start before any trial ends, are watched: they
hold the preset's baselines, and a trial sampled late in a budget is expected to be cut.
"""

from __future__ import annotations

import math

# Rounds the suggested budget up, with room for the trials that start after the first ones.
MARGIN = 1.15


class BudgetForecast:
    def __init__(self, epochs: int, time_budget_s: float | None) -> None:
        self.epochs = epochs
        self.time_budget_s = time_budget_s
        self.last_epoch_at: dict[str, float] = {}  # the watched trials' latest epoch
        self.a_trial_ended = False
        self.warned = False

    def ended(self) -> None:
        self.a_trial_ended = True

    def epoch(self, trial_id: str, epoch: int, elapsed_s: float) -> str | None:
        """A trial reported ``epoch`` at ``elapsed_s`` since the search started: the warning, the
        first time a trial's projected end lies after the budget, else None."""
        if trial_id not in self.last_epoch_at and self.a_trial_ended:
            return None  # started after the first trials began to end: never watched
        previous = self.last_epoch_at.get(trial_id)
        self.last_epoch_at[trial_id] = elapsed_s
        if self.warned or self.time_budget_s is None or previous is None or epoch >= self.epochs:
            return None
        per_epoch = elapsed_s - previous
        projected_end = elapsed_s + (self.epochs - epoch) * per_epoch
        if projected_end <= self.time_budget_s:
            return None
        self.warned = True
        suggested = 60 * math.ceil(projected_end * MARGIN / 60)
        return (f"time budget: at {per_epoch:.0f} s an epoch, this trial's {self.epochs} epochs would end "
                f"at about {_clock(projected_end)}, after the budget of {_clock(self.time_budget_s)}, "
                f"which will cut it before its last epochs (the best epoch so far is kept); "
                f"--time-budget {suggested / 60:g}m lets the first trials finish")


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}:{rest:02d}"
