"""lrra/phase_clock.py on the CPU: the mean of each phase's spans, then an empty clock."""

import time

import torch

from lrra.phase_clock import PhaseClock


def test_the_mean_seconds_of_each_phase_and_a_fresh_start():
    clock = PhaseClock(torch.device("cpu"))
    for pause in (0.01, 0.03):
        with clock.phase("slow"):
            time.sleep(pause)
    with clock.phase("quick"):
        pass
    means = clock.mean_seconds()
    assert set(means) == {"slow", "quick"}
    assert 0.02 <= means["slow"] < 0.2 and means["quick"] < means["slow"]
    assert clock.mean_seconds() == {}
