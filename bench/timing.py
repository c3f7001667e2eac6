"""The one timing helper of bench/: wall seconds of a call, synchronised with the device.

Every command in bench/ times through ``timed`` (one call) or ``interleaved_medians`` (several
variants, round-robin, so that load from other work on a shared machine hits all of them alike).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | None) -> None:
    """Wait for queued device work: a CUDA call returns before its kernels finish."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[T, float]:
    """(fn's result, wall seconds of the call, device work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def interleaved_medians(steps: dict[str, Callable[[], object]], *, rounds: int, reps: int = 1, warmup: int = 1,
                        device: torch.device | None = None) -> dict[str, float]:
    """Median seconds per call of each step over ``rounds`` rounds of ``reps`` calls.

    Warm-up calls (allocator, cuDNN autotune, lazy init) run first and are not counted. Steps
    take turns round by round, so drift over the run hits every variant alike.
    """
    if rounds < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"rounds and reps must be >= 1 and warmup >= 0, got {rounds}, {reps}, {warmup}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _, seconds = timed(lambda step=step: [step() for _ in range(reps)], device)
            samples[name].append(seconds / reps)
    return {name: statistics.median(values) for name, values in samples.items()}
