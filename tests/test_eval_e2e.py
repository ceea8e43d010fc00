"""Real-data check: the DriveLM sample converted to DriveBench format, answered by a tiny model, MCQ-scored in both
modes, graded over HTTP by the local judge server with the real client (2 runs), aggregated and correlated."""

from __future__ import annotations

import json

import pytest
import torch

from drivekd.data.drivebench import to_drivebench
from drivekd.data.drivelm import import_drivelm
from drivekd.evaluation.evaluate import score
from drivekd.evaluation.generate import generate_hf
from drivekd.evaluation.inputs import load_samples
from drivekd.evaluation.judge import JudgeConfig
from drivekd.evaluation.predictions import PredictionWriter, read_predictions
from drivekd.evaluation.rubrics import drivebench_tags
from drivekd.evaluation.server import JudgeServer, offline_responder
from drivekd.models.pair import build_tiny_pair

FRAMES = 3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.shared
def test_drivelm_sample_end_to_end(shared_drivelm, tmp_path):
    imported = import_drivelm(shared_drivelm / "test_eval.json", shared_drivelm).samples
    frames = list(dict.fromkeys(s.frame_id for s in imported))[:FRAMES]
    chosen = [s for s in imported if s.frame_id in frames]
    bench_file = tmp_path / "drivebench.json"
    bench_file.write_text(json.dumps(to_drivebench(chosen)))
    samples, root = load_samples(bench_file, image_root=shared_drivelm)
    assert [s.question for s in samples] == [s.question for s in chosen]
    assert all(len(s.images) == 6 for s in samples)

    pair = build_tiny_pair("qwen2_5_vl")
    preds = tmp_path / "preds.jsonl"
    with PredictionWriter(preds, model="tiny-student") as writer:
        summary = generate_hf(
            samples,
            pair.student,
            pair.student_processor,
            writer,
            image_root=root,
            max_new_tokens=4,
            progress=False,
        )
    assert summary.written == len(samples)
    tiny = {k: r.prediction for k, r in read_predictions(preds).items()}
    # A well-behaved model's MCQ answers, "<letter>. It is a ...": the article trips the DriveBench rule.
    oracle = {
        s.id: f"{s.answer}. It is a {s.options[s.answer].lower()}" if s.kind == "mcq" else s.answer
        for s in samples
    }

    with JudgeServer(offline_responder(samples)) as server:
        config = JudgeConfig(
            base_url=server.base_url, model="grader", runs=2, cache_path=tmp_path / "cache.sqlite"
        )
        reports = {
            name: score(samples, predictions, model=name, judge=config, progress=False)
            for name, predictions in (("tiny", tiny), ("oracle", oracle))
        }
        assert server.requests == 2 * 2 * reports["tiny"]["judge"]["counts"]["judged_samples"]

    mcq = [s for s in samples if s.kind == "mcq"]
    for report in reports.values():
        for mode in ("strict", "drivebench"):
            assert report["mcq"][mode]["overall"]["total"] == len(mcq)
        judge = report["judge"]
        judged = judge["counts"]["judged_samples"]
        assert judged == sum(s.task != "prediction" or 0 not in drivebench_tags(s) for s in samples)
        assert report["not_judged"]["count"] == len(samples) - judged
        assert (judge["counts"]["gradings"], judge["counts"]["ok"]) == (2 * judged, 2 * judged)
        assert judge["failures"] == [] and set(judge["per_capability"]) == {
            "perception",
            "reasoning",
            "planning",
        }
        assert all(
            stats["std"] == 0.0 for stats in judge["per_task"].values()
        )  # the offline grader is deterministic
        corr = report["correlation"]
        assert corr["images"] == FRAMES
        assert all(corr[k] is None or -1.0 <= corr[k] <= 1.0 for k in ("pearson", "spearman"))
        assert len(report["per_sample"]) == judged
    strict, upstream = (reports["oracle"]["mcq"][m]["overall"] for m in ("strict", "drivebench"))
    assert strict["accuracy"] == 100.0
    not_a = sum(s.answer != "A" for s in mcq)
    assert upstream["correct"] == len(mcq) - not_a  # every non-A answer is read as A by the upstream rule
    assert reports["oracle"]["judge"]["overall"]["mean"] > reports["tiny"]["judge"]["overall"]["mean"]
