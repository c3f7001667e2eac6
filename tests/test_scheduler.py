"""tune/scheduler.py: ASHA records the preset's trial at every rung but never stops it."""

import sys
from pathlib import Path

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tune.scheduler import PRESET_TRIAL_NUMBER, PresetSparingASHA  # noqa: E402
from tune.study import OPTUNA_NUMBER  # noqa: E402


def asha(spared: int | None) -> PresetSparingASHA:
    # One rung after epoch 1; with reduction factor 3 only the top third of a rung goes on.
    return PresetSparingASHA(spared=spared, time_attr="epochs_done", metric="val", mode="max", max_t=9,
                             grace_period=1, reduction_factor=3, stop_last_trials=False)


def trial(number: int) -> Trial:
    return Trial("run_trial", config={OPTUNA_NUMBER: number, "student_lr": 0.05}, stub=True)


def first_rung(scheduler: PresetSparingASHA, order: list[tuple[Trial, float]]) -> list[str]:
    """Each trial's decision after epoch 1, in the order the results arrive."""
    for t, _ in order:
        scheduler.on_trial_add(None, t)
    return [scheduler.on_trial_result(None, t, {"epochs_done": 1, "val": value}) for t, value in order]


@pytest.mark.parametrize("spared, preset_decision", [(PRESET_TRIAL_NUMBER, TrialScheduler.CONTINUE),
                                                     (None, TrialScheduler.STOP)])
def test_the_preset_trial_behind_at_a_rung_goes_on_only_when_spared(spared, preset_decision):
    scheduler = asha(spared)
    other, preset = trial(1), trial(PRESET_TRIAL_NUMBER)
    assert first_rung(scheduler, [(other, 0.9), (preset, 0.5)]) == [TrialScheduler.CONTINUE, preset_decision]


def test_other_trials_are_still_measured_against_the_spared_preset():
    # The preset leads the rung; a weaker trial after it is stopped, as by plain ASHA.
    scheduler = asha(PRESET_TRIAL_NUMBER)
    preset, weak = trial(PRESET_TRIAL_NUMBER), trial(2)
    assert first_rung(scheduler, [(preset, 0.9), (weak, 0.5)]) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert "num_stopped=1" in scheduler.debug_string()
