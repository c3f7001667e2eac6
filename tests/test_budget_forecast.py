"""The search's early warning that its time budget will cut the trials (tune/budget_forecast.py)."""

import io
import time

from tune.budget_forecast import BudgetForecast
from tune.live_view import LineView, TrialBoard


def test_a_trial_that_cannot_finish_in_the_budget_is_announced_once_with_the_budget_that_fits():
    forecast = BudgetForecast(epochs=30, time_budget_s=600)
    assert forecast.epoch("a", 1, elapsed_s=220) is None  # one epoch says nothing of the pace (warm-up, start-up)
    warning = forecast.epoch("a", 2, elapsed_s=255)  # 35 s an epoch: 28 more end at 255 + 980 = 1235 s
    assert warning is not None
    assert "at 35 s an epoch" in warning and "end at about 20:35" in warning and "budget of 10:00" in warning
    assert warning.endswith("--time-budget 24m lets the first trials finish")  # 1235 s x 1.15, rounded up
    assert forecast.epoch("b", 2, elapsed_s=300) is None and forecast.epoch("a", 3, elapsed_s=290) is None  # once


def test_trials_that_fit_a_late_trial_or_a_search_without_budget_say_nothing():
    fits = BudgetForecast(epochs=30, time_budget_s=600)
    assert fits.epoch("slow twin", 1, elapsed_s=30) is None
    assert [fits.epoch("a", epoch, elapsed_s=10 + 15 * epoch) for epoch in range(1, 31)] == [None] * 30
    fits.ended()  # the first trial is done at 7:40; one sampled now cannot finish, as expected
    assert [fits.epoch("late", epoch, elapsed_s=460 + 15 * epoch) for epoch in range(1, 4)] == [None] * 3
    # a first trial stays watched after another has ended: 28 more epochs at 440 s each
    assert "--time-budget" in fits.epoch("slow twin", 2, elapsed_s=470)
    unbounded = BudgetForecast(epochs=30, time_budget_s=None)
    assert [unbounded.epoch("a", epoch, elapsed_s=100.0 * epoch) for epoch in range(1, 4)] == [None] * 3


def test_the_board_prints_the_warning_after_the_epoch_and_keeps_it_in_view():
    stream = io.StringIO()
    board = TrialBoard(30, LineView(stream), time_budget_s=0.05)
    board.epoch("t0", 0, 1, 0.5, 0.5)
    time.sleep(0.02)
    board.epoch("t0", 0, 2, 0.6, 0.6)
    board.epoch("t0", 0, 3, 0.7, 0.7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "epoch 2/30" in lines[1] and "epoch 3/30" in lines[3]
    assert "trial 0 (t0) time budget: at 0 s an epoch" in lines[2] and "--time-budget 1m" in lines[2]
    assert board.notes == [lines[2]]  # the terminal's table shows it under itself until the end
