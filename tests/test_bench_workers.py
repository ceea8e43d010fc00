"""Benchmark workers: a reference the kernel kills for memory is reported as not measurable, other failures stop."""

from __future__ import annotations

import json
import os
import sys

import pytest

from drivekd.bench.workers import run_variants

WORKER = """
import json, os, signal, sys
variant, mode = sys.argv[1], sys.argv[2]
if variant == "huge" or (variant == "greedy" and mode == "memory"):
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
if variant == "broken":
    sys.exit("broken variant")
exact = "MALLOC_MMAP_THRESHOLD_" in os.environ
print("noise")
print(json.dumps({"variant": variant, "seconds": 1.0 if mode == "time" else 9.0,
                  "peak_bytes": 1 if mode == "memory" else 99, "exact": exact}))
"""


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "fake_bench_worker.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    return "fake_bench_worker"


def test_time_comes_from_the_normal_allocator_and_memory_from_the_exact_one(module, monkeypatch):
    """Each variant runs twice: its times from the run with the normal allocator, its peaks from the run whose
    large buffers are mmapped (WORKER_ENV)."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    results = run_variants(module, ("sft",))
    assert results["sft"] == {"variant": "sft", "seconds": 1.0, "peak_bytes": 1, "exact": False}


def test_a_killed_reference_is_not_measurable_and_the_others_are_kept(module):
    results = run_variants(module, ("sft", "huge", "greedy", "plain"), may_not_fit={"huge", "greedy"})
    assert results["sft"]["seconds"] == 1.0 and results["sft"]["peak_bytes"] == 1
    assert results["plain"]["variant"] == "plain"
    assert results["huge"]["measurable"] is False and "out of memory; time run" in results["huge"]["why"]
    assert results["greedy"]["measurable"] is False and "memory run" in results["greedy"]["why"]
    json.dumps(results)  # what bench step writes


def test_a_kill_of_a_variant_that_must_fit_and_any_other_failure_stop_the_run(module):
    with pytest.raises(RuntimeError, match=r"variant 'huge' failed \(time run\)"):
        run_variants(module, ("sft", "huge"))
    with pytest.raises(RuntimeError, match=r"variant 'broken' failed \(time run\):\n(.|\n)*broken variant"):
        run_variants(module, ("broken",), may_not_fit={"broken"})


def test_bench_step_prints_and_writes_a_report_with_a_variant_not_measured(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from drivekd.bench import step
    from drivekd.cli import app

    figures = {"seconds": 2.0, "cpu_seconds": 1.5, "peak_bytes": 2**20}
    report = {
        "setup": {"length": 10, "vision_tokens": 4, "cache_bytes": 2**20},
        "results": {
            "sft": {"variant": "sft", **figures},
            "naive_teacher": {"variant": "naive_teacher", "measurable": False, "why": "out of memory"},
        },
        "ratios": {"sft": {"time_ratio": 1.0, "wall_time_ratio": 1.0, "memory_ratio": 1.0}},
        "checks": {},
        "not_measured": {"naive_teacher": "out of memory"},
    }
    monkeypatch.setattr(step, "run", lambda cfg: report)
    out = tmp_path / "step.json"
    result = CliRunner().invoke(app, ["bench", "step", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "naive_teacher: not measurable here (out of memory)" in result.output
    assert json.loads(out.read_text()) == report
