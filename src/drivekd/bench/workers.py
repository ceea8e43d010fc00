"""Run benchmark variants in fresh processes and turn their figures into ratios against a baseline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Collection
from typing import Any


def run_variants(
    module: str, variants: tuple[str, ...], *args: str, may_not_fit: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """``python -m module VARIANT *args`` per variant (its last stdout line is a JSON result).

    A variant of ``may_not_fit`` (a reference whose memory grows past what its own pre-check can foresee) that
    the kernel kills (SIGKILL: out of memory) is recorded as not measurable, so the others' figures are kept.
    """
    results = {}
    for variant in variants:
        cmd = [sys.executable, "-m", module, variant, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == -signal.SIGKILL and variant in may_not_fit:
            why = "killed by the kernel while running (SIGKILL: out of memory)"
            results[variant] = {"variant": variant, "measurable": False, "why": why}
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark variant {variant!r} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


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
