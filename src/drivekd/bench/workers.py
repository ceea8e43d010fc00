"""Run benchmark variants in fresh processes and turn their figures into ratios against a baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Collection
from typing import Any

from drivekd.bench.measure import WORKER_ENV

MODES = ("time", "memory")  # a worker's second argument: what it measures


def run_variants(
    module: str, variants: tuple[str, ...], *args: str, may_not_fit: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """``python -m module VARIANT MODE *args`` per variant and mode (its last stdout line is a JSON result).

    The ``time`` run keeps the normal allocator; the ``memory`` run gets :data:`WORKER_ENV` (exact peak RSS, slow
    allocations). A variant's result is its time run's figures with the memory run's ``peak_bytes`` (and any other
    ``*peak*`` keys). A variant of ``may_not_fit`` (a reference whose memory grows past what its own pre-check can
    foresee) that the kernel kills (SIGKILL: out of memory) is recorded as not measurable, so the others' figures
    are kept.
    """
    results = {}
    for variant in variants:
        runs = {}
        for mode in MODES:
            run = _run(module, variant, mode, args, variant in may_not_fit)
            if not run.get("measurable", True):
                results[variant] = run
                break
            runs[mode] = run
        else:
            peaks = {k: v for k, v in runs["memory"].items() if "peak" in k}
            results[variant] = {**{k: v for k, v in runs["time"].items() if "peak" not in k}, **peaks}
    return results


def _run(module: str, variant: str, mode: str, args: tuple[str, ...], may_not_fit: bool) -> dict[str, Any]:
    env = {**os.environ, **WORKER_ENV} if mode == "memory" else None
    cmd = [sys.executable, "-m", module, variant, mode, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == -signal.SIGKILL and may_not_fit:
        why = f"killed by the kernel while running (SIGKILL: out of memory; {mode} run)"
        return {"variant": variant, "measurable": False, "why": why}
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark variant {variant!r} failed ({mode} run):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_time(result: dict[str, Any]) -> float:
    """The time a ratio compares: CPU time where it was measured (CPU workers), else wall time."""
    return result["cpu_seconds"] if result.get("cpu_seconds") is not None else result["seconds"]


def ratios(results: dict[str, dict[str, Any]], base: str = "sft") -> dict[str, dict[str, float]]:
    """Time (:func:`step_time`), wall-time and peak-memory ratios of every variant against ``base`` (same run)."""
    reference = results[base]
    return {
        variant: {
            "time_ratio": step_time(result) / step_time(reference),
            "wall_time_ratio": result["seconds"] / reference["seconds"],
            "memory_ratio": result["peak_bytes"] / reference["peak_bytes"],
        }
        for variant, result in results.items()
    }
