"""The drivekd command line as a user runs it, and the capture benchmark end to end on a micro decoder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from drivekd.bench.capture import VARIANTS, CaptureBenchConfig, run
from drivekd.cli import app
from drivekd.data.schema import read_jsonl

runner = CliRunner()


def test_import_validate_export(tmp_path, shared_drivelm):
    out = tmp_path / "eval.jsonl"
    result = runner.invoke(
        app,
        [
            "data",
            "import-drivelm",
            str(shared_drivelm / "test_eval.json"),
            "--out",
            str(out),
            "--image-root",
            str(shared_drivelm),
        ],
    )
    assert result.exit_code == 0, result.output
    samples = list(read_jsonl(out, image_root=shared_drivelm))
    assert len(samples) == 66
    result = runner.invoke(app, ["data", "validate", str(out), "--image-root", str(shared_drivelm)])
    assert result.exit_code == 0 and "66 valid samples" in result.output
    bench = tmp_path / "bench.json"
    result = runner.invoke(
        app, ["data", "export-drivebench", str(out), "--out", str(bench), "--image-root", str(shared_drivelm)]
    )
    assert result.exit_code == 0, result.output
    again = tmp_path / "again.jsonl"
    result = runner.invoke(
        app,
        ["data", "import-drivebench", str(bench), "--out", str(again), "--image-root", str(shared_drivelm)],
    )
    assert result.exit_code == 0, result.output
    assert [s.question for s in read_jsonl(again, image_root=shared_drivelm)] == [s.question for s in samples]


def test_bad_input_is_a_named_error_and_skip_invalid_keeps_the_rest(tmp_path, shared_drivelm):
    rows = json.loads((shared_drivelm / "test_eval.json").read_text())
    scene = next(iter(rows))
    frame = next(iter(rows[scene]["key_frames"]))
    rows[scene]["key_frames"][frame]["QA"]["perception"][0]["Q"] += " <c9,CAM_TOP,10,10>"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    args = ["data", "import-drivelm", str(broken), "--out", str(out), "--image-root", str(shared_drivelm)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"{scene}/{frame}/QA/perception/0" in result.output and "CAM_TOP" in result.output
    assert not out.exists()
    result = runner.invoke(app, [*args, "--skip-invalid"])
    assert result.exit_code == 0 and "65 samples" in result.output and "1 skipped" in result.output


def test_models_tiny_saves_a_loadable_pair(tmp_path):
    result = runner.invoke(app, ["models", "tiny", "--out", str(tmp_path), "--family", "internvl"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert (tmp_path / "student" / "config.json").is_file()
    result = runner.invoke(app, ["models", "tiny", "--out", str(tmp_path), "--family", "llama"])
    assert result.exit_code == 2 and "unknown model family" in result.output


def test_capture_benchmark_reports_ratios_for_every_variant():
    micro = CaptureBenchConfig(
        hidden=32,
        layers=3,
        heads=4,
        kv_heads=2,
        intermediate=64,
        vocab=512,
        grid=(8, 8),
        text_before=4,
        text_after=12,
        answer=6,
        steps=1,
    )
    report = run(micro)
    assert set(report["ratios"]) == set(VARIANTS)
    assert report["ratios"]["sft"] == {"time_ratio": 1.0, "wall_time_ratio": 1.0, "memory_ratio": 1.0}
    for variant in VARIANTS:
        result = report["results"][variant]
        assert result["seconds"] > 0 and result["peak_bytes"] > 0
        assert result["vision_tokens"] == 16 and result["length"] == micro.length


def test_measure_counts_cpu_time_not_waiting():
    """A worker that waits (for a core, or here in sleep) accrues wall time but no CPU time; busy work accrues both."""
    import time

    import torch

    from drivekd.bench.measure import measure

    cpu = torch.device("cpu")
    waited = measure(lambda: time.sleep(0.3), cpu)
    assert waited.seconds >= 0.3 and waited.cpu_seconds < 0.1

    def busy() -> None:
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass

    worked = measure(busy, cpu)
    assert worked.cpu_seconds >= 0.3 and worked.seconds >= worked.cpu_seconds * 0.9


@pytest.mark.slow
def test_step_benchmark_reports_every_variant():
    from drivekd.bench import step

    micro = step.StepBenchConfig(
        student=(32, 3, 2, 1, 64), teacher=(48, 4, 4, 2, 96), image_size=(112, 63), periods=1, refresh=2
    )
    variants = (
        "sft",
        "none",
        "agp",
        "agp_amortised",
        "naive",
        "none_teacher",
        "agp_teacher",
        "agp_teacher_ckpt",
        "naive_teacher",
    )
    report = step.run(micro, variants=variants)
    assert set(report["ratios"]) == set(variants) and not report["not_measured"]
    for variant, ratio in report["ratios"].items():
        assert ratio["time_ratio"] > 0 and ratio["memory_ratio"] > 0, variant
    # Every variant measured the same steps (the same batches), the amortised one including its refresh.
    assert {len(r["step_seconds"]) for r in report["results"].values()} == {2}
    # On CPU the time ratios compare the workers' CPU time (what other jobs on the machine do not inflate).
    sft, none = report["results"]["sft"], report["results"]["none"]
    assert len(sft["step_cpu_seconds"]) == 2 and sft["cpu_seconds"] > 0
    assert report["checks"]["plain_multi_time_vs_sft"] == pytest.approx(
        none["cpu_seconds"] / sft["cpu_seconds"]
    )
    assert report["ratios"]["none"]["wall_time_ratio"] == pytest.approx(none["seconds"] / sft["seconds"])
    assert set(report["checks"]) == {
        "plain_multi_time_vs_sft",
        "plain_multi_memory_vs_sft",
        "agp_memory_vs_plain_multi",
        "agp_faster_than_naive",
        "amortised_time_vs_plain_multi",
        "agp_teacher_memory_vs_plain_multi",
        "agp_teacher_faster_than_naive",
        "agp_teacher_ckpt_memory_vs_plain_multi",
    }
    assert report["setup"]["cache_bytes"] > 0


@pytest.mark.slow
def test_step_benchmark_large_size_measures_one_sample_per_step_in_the_teacher_grouping():
    from drivekd.bench import step

    micro = step.config_for(
        "large", student=(32, 3, 2, 1, 64), teacher=(48, 4, 4, 2, 96), image_size=(112, 63)
    )
    report = step.run(micro, variants=("sft", "none_teacher", "agp_teacher"))
    assert tuple(report["config"]["student"]) == (32, 3, 2, 1, 64)
    assert report["setup"]["samples"] == 3  # one cached sample per capability
    assert {len(r["step_seconds"]) for r in report["results"].values()} == {2}  # warm-up + two measured steps
    assert set(report["checks"]) == {
        "plain_multi_time_vs_sft",
        "plain_multi_memory_vs_sft",
        "agp_teacher_memory_vs_plain_multi",
    }
    with pytest.raises(ValueError, match="--size must be one of quick, default, large"):
        step.config_for("huge")
