"""Evaluation inputs: a raw DriveBench file read by the data side's importer (--text-only, --visual-descriptions)
scores exactly as the JSONL imported from it, and text-only samples reach vLLM without images."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
import yaml
from typer.testing import CliRunner

from drivekd.data.cli import data_app
from drivekd.data.schema import read_jsonl
from drivekd.errors import DataError
from drivekd.evaluation.cli import eval_app
from drivekd.evaluation.inference import InferenceBenchConfig, ModelSpec, _vllm_worker
from drivekd.evaluation.inputs import load_samples
from drivekd.evaluation.prompts import DRIVEBENCH_TEMPLATES
from drivekd.evaluation.server import JudgeServer, offline_responder

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "drivebench-sample"
TEST_FILE = SAMPLE / "drivebench-test-head.json"
DESCRIPTIONS = SAMPLE / "visual_description-head.json"
runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.add_typer(data_app, name="data")
    return app


def _invoke(*args: str | Path) -> Any:
    return runner.invoke(_app(), [str(a) for a in args])


@pytest.fixture
def real(tmp_path: Path) -> tuple[Path, Path]:
    """The real rows imported text-only with their visual descriptions (JSONL), and predictions for every sample:
    the truth for every other sample, a wrong text for the rest."""
    if not TEST_FILE.is_file():
        pytest.skip("../shared/data/drivebench-sample is not present")
    jsonl = tmp_path / "bench.jsonl"
    result = _invoke(
        "data",
        "import-drivebench",
        TEST_FILE,
        "--out",
        jsonl,
        "--text-only",
        "--visual-descriptions",
        DESCRIPTIONS,
    )
    assert result.exit_code == 0, result.output
    samples = list(read_jsonl(jsonl))
    rows = [
        {
            "id": s.id,
            "prediction": s.answer if k % 2 else "C. Not sure.",
            "model": "m",
            "new_tokens": 1,
            "seconds": 0.0,
        }
        for k, s in enumerate(samples)
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return jsonl, preds


def _score(source: Path, out: Path, base_url: str, *extra: str | Path) -> dict[str, Any]:
    cache = out.with_suffix(".sqlite")
    args = ["eval", "score", source, "--out", out, "--judge-base-url", base_url, "--judge-model", "grader"]
    result = _invoke(*args, "--runs", "1", "--cache", cache, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what names its input files (the cache and prompt paths)."""
    judge = {k: v for k, v in report["judge"].items() if k not in ("config", "provenance")}
    return {**report, "judge": judge}


@pytest.mark.shared
def test_raw_drivebench_file_scores_as_the_imported_jsonl(real, tmp_path):
    jsonl, preds = real
    samples = list(read_jsonl(jsonl))
    raw_opts = ("--text-only", "--visual-descriptions", DESCRIPTIONS, "--predictions", preds)
    with JudgeServer(offline_responder(samples)) as server:
        raw = _score(TEST_FILE, tmp_path / "raw.json", server.base_url, *raw_opts)
        imported = _score(jsonl, tmp_path / "jsonl.json", server.base_url, "--predictions", preds)
        bare = _score(
            TEST_FILE, tmp_path / "bare.json", server.base_url, "--text-only", "--predictions", preds
        )
    assert raw["samples"] == 37 and raw["not_judged"]["count"] == 5  # the prediction tag [0] rows
    assert _comparable(raw) == _comparable(imported)
    assert raw["judge"]["counts"]["ok"] == 32 and raw["mcq"]["strict"]["overall"]["total"] > 0
    # The descriptions reached the judge: without them the prompts of the samples with described objects change.
    described = {s.id for s in samples if s.meta.get("object_infos")}
    hashes = {
        name: {e["id"]: e["prompt_hash"] for e in r["per_sample"]}
        for name, r in (("raw", raw), ("bare", bare))
    }
    judged_described = described & set(hashes["raw"])
    assert judged_described
    assert all(hashes["raw"][i] != hashes["bare"][i] for i in judged_described)
    assert all(hashes["raw"][i] == hashes["bare"][i] for i in set(hashes["raw"]) - described)


def _hash_grader(body: dict[str, Any]) -> tuple[int, str]:
    """A judge whose grade is a function of the whole prompt, so equal grades mean equal requests."""
    content = body["messages"][0]["content"]
    return 200, f"Total Score: {int(hashlib.sha256(content.encode()).hexdigest(), 16) % 101}"


@pytest.mark.shared
def test_drivebench_protocol_on_the_raw_file(real, tmp_path):
    jsonl, preds = real
    prompts = tmp_path / "prompts.yaml"
    templates = dict.fromkeys(
        DRIVEBENCH_TEMPLATES.values(), "Q: {QUESTION}\nTruth: {GT}\nAnswer: {PRED}\nTotal Score:"
    )
    templates["PERCEPTION_MCQ_PROMPT"] = (
        "Q: {QUESTION}\nObject: {DESC}\nTruth: {GT}\nAnswer: {PRED}\nTotal Score:"
    )
    prompts.write_text(yaml.safe_dump(templates))
    protocol = ("--judge-protocol", "drivebench", "--judge-prompts", prompts, "--predictions", preds)
    with JudgeServer(_hash_grader) as server:
        raw = _score(
            TEST_FILE,
            tmp_path / "raw.json",
            server.base_url,
            "--text-only",
            "--visual-descriptions",
            DESCRIPTIONS,
            *protocol,
        )
        imported = _score(jsonl, tmp_path / "jsonl.json", server.base_url, *protocol)
        without = _invoke(
            "eval", "score", TEST_FILE, "--out", tmp_path / "x.json", "--text-only", "--judge-base-url",
            server.base_url, "--judge-model", "grader", "--cache", tmp_path / "x.sqlite", "--no-progress", *protocol,
        )  # fmt: skip
    scores = {e["id"]: e["scores"] for e in raw["per_sample"]}
    assert len(scores) == 32 and scores == {e["id"]: e["scores"] for e in imported["per_sample"]}
    assert len({s for v in scores.values() for s in v}) > 5  # the grades do depend on the prompts
    # Perception MCQ templates ask for the description; without the file the command stops with a named error.
    assert without.exit_code == 2 and "no visual description for the object <c" in without.output
    assert not (tmp_path / "x.json").exists()


def test_load_samples_options(tmp_path, samples, image_dir):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("".join(s.model_dump_json() + "\n" for s in samples))
    with pytest.raises(DataError, match="image not found"):
        load_samples(jsonl)  # the images are in image_dir, not next to the file
    loaded, root = load_samples(jsonl, text_only=True)
    assert root == tmp_path and all(s.text_only and s.shown_images == [] for s in loaded)
    assert [s.model_copy(update={"text_only": False}) for s in loaded] == samples
    assert not any(s.text_only for s in load_samples(jsonl, image_root=image_dir)[0])
    with pytest.raises(DataError, match="attached when a DriveBench file is read"):
        load_samples(jsonl, image_root=image_dir, visual_descriptions=tmp_path / "v.json")
    bench = tmp_path / "bench.json"
    bench.write_text("[]")
    with pytest.raises(DataError, match="needs the image root") as err:
        load_samples(bench)
    assert "--text-only" in str(err.value)


class _FakeLLM:
    """Stands in for ``vllm.LLM``: records every request and answers with three tokens."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = False) -> list[Any]:
        _FakeLLM.requests.extend(prompts)
        out = types.SimpleNamespace(token_ids=[1, 2, 3], text="ok")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


def test_vllm_benchmark_sends_no_image_for_text_only_samples(monkeypatch, samples, image_dir):
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(_FakeLLM, "requests", [])
    mixed = [samples[0].model_copy(update={"text_only": True}), samples[1]]
    spec = ModelSpec("preset", "preset", preset="qwen2.5-vl-3b")
    cfg = InferenceBenchConfig(n_samples=2, max_new_tokens=3, ttft_runs=1, backend="vllm")
    result = _vllm_worker(spec, cfg, mixed, image_dir)
    assert result["gen_tokens"] == 6
    first = {id(r): r for r in _FakeLLM.requests}  # warm-up, measured and TTFT calls reuse the same dicts
    text_only = [r for r in first.values() if "multi_modal_data" not in r]
    with_images = [r for r in first.values() if "multi_modal_data" in r]
    assert len(text_only) == 1 and set(text_only[0]) == {"prompt"}
    assert "<|vision_start|>" not in text_only[0]["prompt"] and samples[0].question in text_only[0]["prompt"]
    assert len(with_images) == 1 and len(with_images[0]["multi_modal_data"]["image"]) == 2
    assert with_images[0]["prompt"].count("<|vision_start|>") == 2
