"""Peak-memory, wall-time and (on CPU) process CPU-time measurement of one piece of work in the current process.

CPU time (``time.process_time``, every thread of the process) is what other jobs on a shared machine do not
inflate: a worker that waits for a core accrues wall time but not CPU time, so on CPU the benchmarks' time ratios
use it (with the same thread count in every worker they compare like with like) and report wall time beside it.

CPU: the kernel's peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs before the work and read after it, so
earlier peaks (model construction) do not count; glibc's heap is trimmed first so freed memory is not mistaken for
headroom. RSS is only exact when large buffers go back to the system as they are freed: memory is measured in
worker processes started with :data:`WORKER_ENV` (every allocation of 64 KiB or more an mmap). That allocator
costs a page-fault round trip per large temporary, which inflates time (a training step with many temporaries ran
1.8x slower), so times are measured in a second process with the normal allocator (:func:`drivekd.bench.workers.
run_variants` runs both and merges them). Switching the allocator inside one process after the timed runs was
tried and left peaks that varied by 25% from run to run. GPU: ``max_memory_allocated`` after a peak reset, summed
over devices.
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

# Environment for the worker processes that measure memory: every allocation of 64 KiB or more is an mmap.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_bytes: int  # peak growth over the memory in use when the work started
    cpu_seconds: float | None = None  # process CPU time (CPU device only)


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
    """Run ``work`` once and return its wall time, peak memory growth on ``device`` and, on CPU, its CPU time."""
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
    start, cpu_start = time.perf_counter(), time.process_time()
    work()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return Measurement(seconds, _vm_hwm() - before, cpu_seconds)
