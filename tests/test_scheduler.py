"""tune/scheduler.py: ASHA records the baseline trials at every rung but never stops them."""

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from tune.scheduler import BaselineSparingASHA, baseline_numbers
from tune.study import OPTUNA_NUMBER

PRESET, COUNTERPART, SAMPLED = 0, 1, 2  # Optuna numbers: the baselines come first (three on mnist)


def asha(spared) -> BaselineSparingASHA:
    # One rung after epoch 1; with reduction factor 3 only the top third of a rung goes on.
    return BaselineSparingASHA(spared=spared, time_attr="epochs_done", metric="val", mode="max", max_t=9,
                               grace_period=1, reduction_factor=3, stop_last_trials=False)


def trial(number: int) -> Trial:
    return Trial("run_trial", config={OPTUNA_NUMBER: number, "student_lr": 0.05}, stub=True)


def first_rung(scheduler: BaselineSparingASHA, order: list[tuple[Trial, float]]) -> list[str]:
    """Each trial's decision after epoch 1, in the order the results arrive."""
    for t, _ in order:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"epochs_done": 1, "val": value}) for t, value in order]


@pytest.mark.parametrize("behind", [PRESET, COUNTERPART])
@pytest.mark.parametrize("spared, decision", [(baseline_numbers(2), TrialScheduler.CONTINUE),
                                              (baseline_numbers(0), TrialScheduler.STOP)])
def test_a_baseline_behind_at_a_rung_goes_on_only_when_spared(behind, spared, decision):
    scheduler = asha(spared)
    leader, baseline = trial(SAMPLED), trial(behind)
    assert first_rung(scheduler, [(leader, 0.9), (baseline, 0.5)]) == [TrialScheduler.CONTINUE, decision]


def test_only_the_baselines_are_spared():
    # Only the preset is a baseline (its space leaves no room for the counterpart): trial 1 is sampled.
    scheduler = asha(baseline_numbers(1))
    leader, sampled = trial(SAMPLED), trial(COUNTERPART)
    assert first_rung(scheduler, [(leader, 0.9), (sampled, 0.5)]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_other_trials_are_still_measured_against_the_spared_baselines():
    # The preset leads the rung; a weaker trial after it is stopped, as by plain ASHA.
    scheduler = asha(baseline_numbers(2))
    preset, weak = trial(PRESET), trial(SAMPLED)
    assert first_rung(scheduler, [(preset, 0.9), (weak, 0.5)]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert "num_stopped=1" in scheduler.debug_string()
