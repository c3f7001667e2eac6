"""Peak memory of one call: device memory on a GPU, the process's peak RSS growth on a CPU.

- CUDA: ``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it
  (tensors only; the caching allocator's reserve is not counted).
- CPU (Linux): the kernel's resident-set high-water mark (VmHWM) is reset through
  /proc/self/clear_refs, after ``malloc_trim`` has handed freed heap pages back, so that the
  growth is memory the call itself touched. It counts everything the process maps (allocator
  slack included), so it reads a little above the tensors alone. tracemalloc is no use here: it
  does not see PyTorch's allocations.
Elsewhere (no /proc) the CPU figure is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

import torch

from bench.timing import synchronize

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
CPU_METHOD = "peak RSS growth (Linux VmHWM reset via /proc/self/clear_refs, after malloc_trim)"
CUDA_METHOD = "torch.cuda.max_memory_allocated growth"


def method(device: torch.device) -> str:
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _trim_heap() -> None:
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def peak_growth_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB of memory the call needed above what was in use when it started."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not (STATUS.exists() and CLEAR_REFS.exists()):
        return None
    _trim_heap()
    CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024
