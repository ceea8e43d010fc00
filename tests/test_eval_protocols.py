"""Judge parity: the drivebench protocol (DriveBench's prompts read with ast, temperature 0, the first "Total
Score:"), provenance in the score report, the real DriveBench rows judged through the local server with their
visual descriptions, and a cache that refuses to mix grades made under different settings."""

from __future__ import annotations

import inspect
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from drivekd.data.drivebench import import_drivebench
from drivekd.data.qa import infer_kind, parse_options
from drivekd.data.schema import TASK_TO_CAPABILITY, ImageRef, Sample
from drivekd.data.tags import parse_tags
from drivekd.errors import DriveKDError
from drivekd.evaluation.cache import JudgeCache
from drivekd.evaluation.evaluate import score
from drivekd.evaluation.judge import JudgeConfig, parse_first_total, parse_total
from drivekd.evaluation.prompts import DRIVEBENCH_TEMPLATES, read_drivebench_prompts
from drivekd.evaluation.server import JudgeServer, offline_responder

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "drivebench-sample"
MIRROR = Path("/work/.mirror/worldbench+drivebench/repo")

# A look-alike of DriveBench's evaluate/prompts.py (our own wording, same shape), with code that must never run.
PROMPTS_PY = """
import os
open({marker!r}, "w").write("executed")
os.system("touch " + {marker!r})

_SHEET = "Scoring sheet\\nTotal Score: "
PERCEPTION_MCQ_PROMPT = "Grade the choice.\\nQ: {{QUESTION}}\\nObject: {{DESC}}\\nTruth: {{GT}}\\nAnswer: {{PRED}}\\n" + _SHEET
PERCEPTION_VQA_PROMPT = "Grade the description.\\nQ: {{QUESTION}}\\nAnswer: {{PRED}}\\nTruth: {{GT}}\\n" + _SHEET
PREDICTION_MCQ_PROMPT = "unused by the routing"
PREDICTION_VQA_PROMPT = "Grade the forecast.\\nQ: {{QUESTION}}\\nTruth: {{GT}}\\nAnswer: {{PRED}}\\n" + _SHEET
PLANNING_VQA_PROMPT = (
    "Grade the plan.\\nQ: {{QUESTION}}\\nObject: {{DESC}}\\nTruth: {{GT}}\\nAnswer: {{PRED}}\\n" + _SHEET
)
BEHAVIOR_MCQ_PROMPT = "Grade the behaviour.\\nQ: {{QUESTION}}\\nTruth: {{GT}}\\nAnswer: {{PRED}}\\n" + _SHEET
EXTRA = {{"note": "a dict of strings is read too"}}
"""
REQUEST_PY = """
class GPTEvaluation:
    def prepare_chatgpt_message(self, prompt):
        system_message = "You grade driving answers."
        self.addTextPrompt(system_message)
"""
EVAL_PY = """
def extract_visual_description(question):
    if question == "In this scenario, what are safe actions to take for the ego vehicle?":
        return "No object for this one."
"""
TWO_TOTALS = "1. Correctness: 40\nTotal Score: 40\nOn reflection:\nTotal Score: 90"


def _checkout(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "executed.txt"
    folder = tmp_path / "drivebench" / "evaluate"
    folder.mkdir(parents=True)
    (folder / "prompts.py").write_text(PROMPTS_PY.format(marker=str(marker)))
    (folder / "request.py").write_text(REQUEST_PY)
    (folder / "eval.py").write_text(EVAL_PY)
    return folder.parent, marker


def test_prompts_read_with_ast_never_executed(tmp_path):
    checkout, marker = _checkout(tmp_path)
    prompts = read_drivebench_prompts(checkout)
    assert not marker.exists()  # neither open() nor os.system() ran
    assert set(prompts.templates) == set(DRIVEBENCH_TEMPLATES)
    assert prompts.templates["perception_vqa"].endswith("Scoring sheet\nTotal Score: ")
    assert prompts.system == "You grade driving answers."
    assert prompts.fixed_descriptions == {
        "In this scenario, what are safe actions to take for the ego vehicle?": "No object for this one."
    }
    # The prompts.py file itself works too; a YAML file with the same names as well.
    assert read_drivebench_prompts(checkout / "evaluate" / "prompts.py").templates == prompts.templates
    yaml_file = tmp_path / "prompts.yaml"
    yaml_file.write_text(
        json.dumps({**dict.fromkeys(DRIVEBENCH_TEMPLATES.values(), "Q {QUESTION}"), "system": "S"})
    )
    assert read_drivebench_prompts(yaml_file).system == "S"
    broken = tmp_path / "broken.py"
    broken.write_text("PERCEPTION_MCQ_PROMPT = f'{1 + 1}'\n")
    with pytest.raises(DriveKDError, match="PERCEPTION_MCQ_PROMPT"):
        read_drivebench_prompts(broken)


def test_first_total_score_as_upstream():
    assert parse_first_total(TWO_TOTALS) == 40.0
    assert parse_total(TWO_TOTALS) == 90.0  # our protocol reads the last
    assert parse_first_total("Total Score: 1000") is None and parse_first_total("no score") is None


def test_protocol_settings():
    config = JudgeConfig.load(base_url="http://127.0.0.1:1/v1", model="m", protocol="drivebench")
    assert (config.temperature, config.max_tokens, config.runs) == (0.0, 3000, 1)
    assert (
        JudgeConfig.load(base_url="http://127.0.0.1:1/v1", model="m", protocol="drivebench", runs=3).runs == 3
    )
    with pytest.raises(DriveKDError, match="temperature"):
        JudgeConfig.load(base_url="http://127.0.0.1:1/v1", model="m", protocol="drivebench", temperature=0.7)
    assert JudgeConfig.load(base_url="http://127.0.0.1:1/v1", model="m").runs == 5


def _rows() -> tuple[list[dict], dict]:
    rows = json.loads((SAMPLE / "drivebench-test-head.json").read_text())
    return rows, json.loads((SAMPLE / "visual_description-head.json").read_text())


def _samples_from_rows(rows: list[dict], descriptions: dict) -> list[Sample]:
    """The real rows as samples, text only, with the described objects they reference (as upstream matches them:
    by the <cK,CAM prefix). Used while the importer's text-only path is not there."""
    samples, seen = [], {}
    for row in rows:
        key = (row["scene_token"], row["frame_token"], row["question_type"])
        k = seen[key] = seen.get(key, -1) + 1
        options = parse_options(row["question"])
        infos = descriptions[row["scene_token"]]["key_frames"][row["frame_token"]]["key_object_infos"]
        objects = parse_tags(row["question"]) + parse_tags(row["answer"])
        meta = {"drivebench_tag": row["tag"]}
        attached = {}
        for obj in objects:
            match = next((v for p, v in infos.items() if p.startswith(f"<{obj.id},{obj.camera},")), None)
            if match is not None:
                attached[str(obj)] = match
        if attached:
            meta["object_infos"] = attached
        samples.append(
            Sample(
                id=f"{key[0]}_{key[1]}_{key[2]}_{k}",
                images=[ImageRef(camera=c, path=p) for c, p in row["image_path"].items()],
                question=row["question"],
                capability=TASK_TO_CAPABILITY[row["question_type"]],
                task=row["question_type"],
                kind=infer_kind(row["answer"], options),
                options=options,
                answer=row["answer"],
                meta=meta,
            )
        )
    return samples


def _real_samples() -> list[Sample]:
    rows, descriptions = _rows()
    if "text_only" in inspect.signature(import_drivebench).parameters:
        return import_drivebench(
            SAMPLE / "drivebench-test-head.json",
            None,
            text_only=True,
            visual_descriptions=SAMPLE / "visual_description-head.json",
        ).samples
    return _samples_from_rows(rows, descriptions)


@pytest.mark.shared
def test_real_rows_judged_with_drivebench_prompts_and_visual_descriptions(tmp_path):
    if not SAMPLE.exists():
        pytest.skip("../shared/data/drivebench-sample is not present")
    rows, descriptions = _rows()
    samples = _real_samples()
    assert len(samples) == len(rows) == 37
    checkout, _ = _checkout(tmp_path)
    prompts = read_drivebench_prompts(checkout)
    predictions = {s.id: f"My answer to: {s.question[:40]}" for s in samples}
    bodies: list[dict] = []

    def two_totals(body: dict) -> tuple[int, str]:
        bodies.append(body)
        return 200, TWO_TOTALS

    with JudgeServer(two_totals) as server:
        config = JudgeConfig(
            base_url=server.base_url, model="judge", protocol="drivebench", cache_path=tmp_path / "c.sqlite"
        )
        report = score(samples, predictions, model="m", judge=config, prompts=prompts, progress=False)
    yes_no = sum(r["question_type"] == "prediction" and r["tag"] == [0] for r in rows)
    assert yes_no == 5  # the sample's README: prediction tag [0] rows
    assert report["not_judged"]["count"] == yes_no
    assert report["judge"]["counts"]["judged_samples"] == len(rows) - yes_no == len(bodies)
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 3000 for b in bodies)
    assert all(
        len(b["messages"]) == 1 and b["messages"][0]["content"].startswith("You grade") for b in bodies
    )
    assert {s for entry in report["per_sample"] for s in entry["scores"]} == {40.0}  # the first Total Score
    # Where the template asks for it, the judge saw the referenced object's description, lower-cased as upstream.
    by_question = {b["messages"][0]["content"].split("\nQ: ")[1].split("\n")[0]: b for b in bodies}
    checked = 0
    for row in rows:
        if row["question_type"] != "perception" or row["tag"] != [0]:
            continue
        obj = parse_tags(row["question"])[0]
        infos = descriptions[row["scene_token"]]["key_frames"][row["frame_token"]]["key_object_infos"]
        desc = next(v for k, v in infos.items() if k.startswith(f"<{obj.id},{obj.camera},"))[
            "Visual_description"
        ]
        assert f"Object: {desc.lower()}\n" in by_question[row["question"]]["messages"][0]["content"]
        checked += 1
    assert checked == 5
    provenance = report["judge"]["provenance"]
    assert provenance["protocol"] == "drivebench" and provenance["temperature"] == 0.0
    assert (
        provenance["rubrics"]["source"] == "drivebench" and provenance["rubrics"]["sha256"] == prompts.sha256
    )
    assert provenance["rubrics"]["path"] == str(checkout) and provenance["endpoint"] == config.base_url
    assert all(entry["prompt_hash"] for entry in report["per_sample"])


def test_cache_refuses_to_mix_settings(samples, tmp_path):
    predictions = {s.id: s.answer for s in samples}
    cache = tmp_path / "cache.sqlite"
    with JudgeServer(offline_responder(samples)) as server:
        first = JudgeConfig(base_url=server.base_url, model="g", runs=1, cache_path=cache)
        score(samples, predictions, model="m", judge=first, progress=False)
        again = score(samples, predictions, model="m", judge=first, progress=False)
        assert again["judge"]["accounting"]["cache_hits"] == len(samples)
        for change in ({"temperature": 0.3}, {"model": "other"}, {"max_tokens": 99}):
            other = first.model_copy(update=change)
            with pytest.raises(DriveKDError, match="not mixed") as err:
                score(samples, predictions, model="m", judge=other, progress=False)
            assert next(iter(change)) in str(err.value)
    with JudgeServer(offline_responder(samples)) as moved:  # same model name, another endpoint
        moved_config = first.model_copy(update={"base_url": moved.base_url})
        with pytest.raises(DriveKDError, match="endpoint"):
            score(samples, predictions, model="m", judge=moved_config, progress=False)
    legacy = tmp_path / "old.sqlite"
    with sqlite3.connect(legacy) as db:
        db.execute("CREATE TABLE replies (judge_model TEXT)")
    with pytest.raises(DriveKDError, match="older Drive-KD"):
        JudgeCache(legacy)


@pytest.mark.skipif(not MIRROR.exists(), reason="no fetched DriveBench mirror")
def test_reads_the_released_prompts(tmp_path):
    folder = tmp_path / "evaluate"
    folder.mkdir()
    for name in ("prompts.py", "request.py", "eval.py"):
        blob = subprocess.check_output(["git", "-C", str(MIRROR), "show", f"HEAD:evaluate/{name}"])
        (folder / name).write_bytes(blob)
    prompts = read_drivebench_prompts(tmp_path)
    assert all("Total Score:" in t and "{PRED}" in t and "{GT}" in t for t in prompts.templates.values())
    assert (
        "{DESC}" in prompts.templates["perception_mcq"]
        and prompts.system
        and len(prompts.fixed_descriptions) == 1
    )
