"""Deployment metrics: eqs. 27-28, paper-size presets, and the side-by-side benchmark on a tiny pair."""

from __future__ import annotations

import statistics

import pytest
import torch

from drivekd.evaluation.inference import (
    PRESET_PAIRS,
    PRESETS,
    InferenceBenchConfig,
    ModelSpec,
    median_ttft,
    preset_config,
    run,
    table_markdown,
    throughput,
)

# Published parameter counts (model cards) of the models the presets imitate.
PUBLISHED_PARAMETERS = {
    "internvl3-1b": 0.938e9,
    "internvl3-8b": 7.94e9,
    "qwen2.5-vl-3b": 3.75e9,
    "qwen2.5-vl-7b": 8.29e9,
}


def test_throughput_is_eq_27_and_ttft_is_eq_28():
    tokens, seconds = [64, 64, 10], [2.0, 1.5, 0.5]
    assert throughput(tokens, seconds) == pytest.approx(138 / 4.0)
    assert throughput([], []) == 0.0
    times = [0.9, 0.2, 0.4, 5.0]
    assert median_ttft(times) == pytest.approx(statistics.median(times)) == pytest.approx(0.65)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_paper_models_sizes(name):
    family, config, _ = preset_config(name)
    with torch.device("meta"):
        model = family.model_cls._from_config(config, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.02)
    assert set(PRESET_PAIRS.values()) == {
        ("internvl3-8b", "internvl3-1b"),
        ("qwen2.5-vl-7b", "qwen2.5-vl-3b"),
    }


@pytest.mark.slow
def test_tiny_pair_side_by_side():
    cfg = InferenceBenchConfig(n_samples=2, max_new_tokens=4, ttft_runs=3, threads=1)
    teacher = ModelSpec("tiny-teacher", "tiny", "qwen2_5_vl", "teacher")
    student = ModelSpec("tiny-student", "tiny", "qwen2_5_vl", "student")
    report = run(teacher, student, cfg)
    t, s = report["results"]["teacher"], report["results"]["student"]
    assert t["parameters"] > s["parameters"] > 0
    for result in (t, s):
        assert result["gen_tokens"] == cfg.n_samples * cfg.max_new_tokens  # every request makes the same work
        assert result["throughput_tok_s"] == pytest.approx(result["gen_tokens"] / result["gen_seconds"])
        assert result["ttft_s_median"] == pytest.approx(statistics.median(result["ttft_runs_s"]))
        assert len(result["ttft_runs_s"]) == cfg.ttft_runs
        assert result["peak_memory_bytes"] > result["weights_bytes"]
    ratios = report["ratios"]
    assert ratios["memory_teacher_over_student"] == pytest.approx(
        t["peak_memory_bytes"] / s["peak_memory_bytes"]
    )
    assert ratios["throughput_student_over_teacher"] == pytest.approx(
        s["throughput_tok_s"] / t["throughput_tok_s"]
    )
    assert ratios["ttft_teacher_over_student"] == pytest.approx(t["ttft_s_median"] / s["ttft_s_median"])
    assert "| Peak memory (GB) |" in table_markdown(report)
