"""Peak-memory and wall-time measurement of one piece of work in the current process.

CPU: the kernel's peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs before the work and read after it, so
earlier peaks (model construction) do not count; glibc's heap is trimmed first so freed memory is not mistaken for
headroom. Run benchmark workers with ``MALLOC_MMAP_THRESHOLD_`` set low (see :data:`WORKER_ENV`) so large buffers
are returned to the system when freed. GPU: ``max_memory_allocated`` after a peak reset, summed over devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

# Environment for benchmark worker processes: every allocation of 64 KiB or more is an mmap, freed back at once.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_bytes: int  # peak growth over the memory in use when the work started


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def measure(work: Callable[[], object], device: torch.device) -> Measurement:
    """Run ``work`` once and return its wall time and peak memory growth on ``device``."""
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
        devices = range(torch.cuda.device_count())
        before = sum(torch.cuda.memory_allocated(d) for d in devices)
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return Measurement(seconds, sum(torch.cuda.max_memory_allocated(d) for d in devices) - before)
    if not _rss_peak_reset():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs): CPU memory needs Linux")
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return Measurement(seconds, _vm_hwm() - before)
