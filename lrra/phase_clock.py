"""Seconds spent in each phase of an epoch (generator steps, student steps), read once at its end.

On a CUDA device a step's Python call returns before its kernels have run, so host timestamps
would time the launches only. There the clock records CUDA events on the current stream instead
and reads them when the epoch ends, where the loop already waits for the device: timing adds no
host synchronisation inside the epoch. Elsewhere it is ``time.perf_counter``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseClock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[str, list[float]] = {}
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            start_s = time.perf_counter()
            yield
            self._host.setdefault(name, []).append(time.perf_counter() - start_s)

    def mean_seconds(self) -> dict[str, float]:
        """Phase name -> mean seconds of one timed span; the clock is then empty again."""
        spans = self._host
        if self._events:
            torch.cuda.synchronize()
            spans = {name: [start.elapsed_time(end) / 1000 for start, end in pairs]
                     for name, pairs in self._events.items()}
        means = {name: sum(seconds) / len(seconds) for name, seconds in spans.items()}
        self._host, self._events = {}, {}
        return means
