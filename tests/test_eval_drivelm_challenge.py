"""The DriveLM challenge scorer (`drivekd eval drivelm`): hand-worked F1, graph filter and final weighting, the
language metrics against the challenge wrapper's documented figures, the real sample in ../shared, our JSONL
predictions mapped to challenge ids, the GPT prompt read with ast, and the command over the local judge server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drivekd.data.drivelm import import_drivelm
from drivekd.errors import DriveKDError
from drivekd.evaluation.drivelm_challenge import (
    ChallengeQA,
    coordinates,
    final_score,
    graph_filter,
    language_metrics,
    language_score,
    match_result,
    read_challenge_predictions,
    read_test,
    score_drivelm,
)
from drivekd.evaluation.judge import JudgeConfig
from drivekd.evaluation.predictions import PredictionRecord, PredictionWriter
from drivekd.evaluation.prompts import read_drivelm_prompt
from drivekd.evaluation.server import JudgeServer, format_check_score, offline_responder

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java"
)
MIRROR = Path("/work/.mirror/OpenDriveLab+DriveLM/repo")

# A look-alike of the challenge's gpt_eval.py (our own text, same shape), with code that must never run.
GPT_EVAL = """
from openai import OpenAI
open({marker!r}, "w").write("executed")


class GPTEvaluation:
    def call_chatgpt(self, chatgpt_messages, max_tokens=40, model="some-model"):
        response = self.client.chat.completions.create(
            model=model, messages=chatgpt_messages, temperature=0.6, max_tokens=max_tokens
        )
        return response.choices[0].message.content, 0

    def prepare_chatgpt_message(self, prompt):
        system_message = "You compare a candidate answer with a reference."
        return [{{"role": "system", "content": system_message}}, {{"role": "user", "content": prompt}}]

    def forward(self, data):
        answer, GT = data
        prompts = "Give a number from 0 to 100 {{braces kept}}."
        prompts = prompts + " Reference: " + GT + " Candidate: " + answer
        reply, _ = self.call_chatgpt(self.prepare_chatgpt_message(prompts), max_tokens=3000)
        return reply
"""


def _qa(qa_id: str, frame: str, question: str, answer: str, tags: tuple[int, ...]) -> ChallengeQA:
    return ChallengeQA(qa_id, "s", frame, "perception", 0, question, answer, tags)


def test_match_f1_hand_worked():
    # (100,200) vs (110,204): L1 14 < 16, a match; (500,500) is 700 from the remaining truth: a false positive.
    matched, f1 = match_result(
        "<c1,CAM_FRONT,100.0,200.0>, <c2,CAM_BACK,500.0,500.0>", "110.0,204.0 800.0,100.0"
    )
    assert matched == [(110.0, 204.0)]
    assert f1 == pytest.approx(0.5, abs=1e-6)  # precision 1/2, recall 1/2
    # Exactly 16 pixels is not a match (strict <); no prediction at all gives 0.
    assert match_result("116.0,200.0", "100.0,200.0")[1] == pytest.approx(0.0)
    assert match_result("nothing", "100.0,200.0")[1] == 0.0
    # Greedy: the first prediction takes the closest truth, the second must settle for the other one.
    matched, f1 = match_result("100.0,100.0 101.0,100.0", "100.5,100.0 110.0,100.0")
    assert matched == [(100.5, 100.0), (110.0, 100.0)] and f1 == pytest.approx(1.0, abs=1e-6)
    # Only decimals count, in pairs; an odd last number is dropped.
    assert coordinates("3 cars at 1.5, 2.5 and 7.0") == [(1.5, 2.5)]


def test_graph_filter_hand_worked():
    first = _qa(
        "s_f_0", "f", "What is important?", "<c1,CAM_FRONT,100.0,200.0>, <c2,CAM_BACK,300.0,400.0>", (2,)
    )
    seen = _qa("s_f_1", "f", "What is <c1,CAM_FRONT,100.0,200.0> doing?", "Stopped.", (0,))
    unseen = _qa("s_f_2", "f", "What is <c2,CAM_BACK,300.0,400.0> doing?", "Moving.", (0,))
    plain = _qa("s_f_3", "f", "Predict the behavior of the ego vehicle.", "Straight.", (0,))
    other = _qa("s_g_0", "g", "Is <c2,CAM_BACK,300.0,400.0> moving?", "No.", (0,))
    # The first answer finds only c1 (c2 is 50 pixels off), so a question about c2 does not count.
    answers = {"s_f_0": "<c1,CAM_FRONT,101.0,201.0>, <c2,CAM_BACK,350.0,400.0>"}
    counted = graph_filter([first, seen, unseen, plain, other], answers)
    assert [q.id for q in counted] == ["s_f_0", "s_f_1", "s_f_3", "s_g_0"]  # a new frame starts afresh


def test_final_weighting_hand_worked():
    language = {"Bleu_1": 0.8, "Bleu_2": 0.6, "Bleu_3": 0.4, "Bleu_4": 0.2, "ROUGE_L": 0.6, "CIDEr": 3.0}
    # mean BLEU 0.5 -> 0.5/3; ROUGE-L 0.6/3; CIDEr 3/10/3
    assert language_score(language) == pytest.approx(0.5 / 3 + 0.2 + 0.1)
    # 0.4 * 50/100 + 0.2 * 0.3 + 0.2 * 40/100 + 0.2 * 0.5
    assert final_score(50.0, 0.3, 40.0, 0.5) == pytest.approx(0.2 + 0.06 + 0.08 + 0.1)
    assert final_score(None, 0.3, 40.0, 0.5) is None


@needs_java
def test_language_metrics_match_the_wrappers_documented_example():
    # language_evaluation's README: CocoEvaluator on these pairs gives these figures.
    out = language_metrics([("i am a boy", "am i a boy ?"), ("she is a girl", "is she a girl ?")])
    assert out["Bleu_1"] == pytest.approx(0.99999999975, abs=1e-9)
    assert out["Bleu_2"] == pytest.approx(0.5773502690332603)
    assert out["ROUGE_L"] == pytest.approx(0.75)
    assert out["CIDEr"] == pytest.approx(10 / 3)


def _expected_counted_without_answers(test_file: Path) -> int:
    """With empty answers no object is matched: per frame the first question and those naming no coordinate."""
    data = json.loads(test_file.read_text())
    total = 0
    for scene in data.values():
        for frame in scene["key_frames"].values():
            qa = frame["QA"]
            questions = [
                q["Q"] for g in ("perception", "prediction", "planning", "behavior") for q in qa.get(g, [])
            ]
            total += 1 + sum(not re.search(r"\d+\.\d+", q) for q in questions[1:])
    return total


@needs_java
@pytest.mark.shared
def test_real_sample_oracle_and_empty(shared_drivelm):
    test_file = shared_drivelm / "test_eval.json"
    test = read_test(test_file)
    assert len(test) == 66 and test[0].id.endswith("_0")
    oracle = score_drivelm(test, {q.id: q.answer for q in test})
    assert oracle["counted_questions"] == 66 and oracle["accuracy"] == 1.0
    assert oracle["match_f1"] == pytest.approx(100.0, abs=1e-5)
    assert oracle["language"]["ROUGE_L"] == pytest.approx(1.0) and oracle["language"][
        "CIDEr"
    ] == pytest.approx(10.0)
    assert oracle["chatgpt"] is None and oracle["final_score"] is None and not oracle["judged"]["chatgpt"]
    empty = score_drivelm(test, {})
    assert empty["counted_questions"] == _expected_counted_without_answers(test_file)
    assert empty["accuracy"] == 0.0 and len(empty["missing_predictions"]) == empty["counted_questions"]


@pytest.mark.shared
def test_our_jsonl_maps_to_challenge_ids_with_pixel_tags(shared_drivelm, tmp_path):
    test_file = shared_drivelm / "test_eval.json"
    samples = import_drivelm(test_file, shared_drivelm).samples
    preds = tmp_path / "preds.jsonl"
    with PredictionWriter(preds, model="m") as writer:
        for s in samples:
            writer.write(PredictionRecord(id=s.id, prediction=s.answer, model="m", new_tokens=1, seconds=0.0))
    test = read_test(test_file)
    answers = read_challenge_predictions(preds, test)
    assert set(answers) == {q.id for q in test}
    # Every answer is the ground truth again, tags back in pixels (within the 4-decimal rounding).
    for q in test:
        truth, back = coordinates(q.answer), coordinates(answers[q.id])
        assert len(truth) == len(back)
        assert all(
            abs(a - b) <= 0.1 + 1e-9
            for p, r in zip(truth, back, strict=True)
            for a, b in zip(p, r, strict=True)
        )
    f1 = [match_result(answers[q.id], q.answer)[1] for q in test if 3 in q.tags]
    assert f1 and all(v == pytest.approx(1.0, abs=1e-6) for v in f1)


def _gpt_eval(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "executed.txt"
    source = tmp_path / "challenge" / "gpt_eval.py"
    source.parent.mkdir()
    source.write_text(GPT_EVAL.format(marker=str(marker)))
    return tmp_path, marker


def test_gpt_prompt_read_with_ast_never_executed(tmp_path):
    checkout, marker = _gpt_eval(tmp_path)
    prompt = read_drivelm_prompt(checkout)
    assert not marker.exists()
    assert (prompt.temperature, prompt.max_tokens) == (0.6, 3000)
    messages = prompt.messages("GT TEXT", "MY ANSWER")
    assert messages[0] == {"role": "system", "content": "You compare a candidate answer with a reference."}
    assert messages[1]["content"] == (
        "Give a number from 0 to 100 {braces kept}. Reference: GT TEXT Candidate: MY ANSWER"
    )
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("system: S\nprompt: 'Rate. Truth: {GT} Mine: {PRED}'\n")
    assert read_drivelm_prompt(yaml_file).messages("a", "b")[1]["content"] == "Rate. Truth: a Mine: b"
    yaml_file.write_text("prompt: 'no placeholders'\n")
    with pytest.raises(DriveKDError, match="GT"):
        read_drivelm_prompt(yaml_file)


@pytest.mark.skipif(not MIRROR.exists(), reason="no fetched DriveLM mirror")
def test_reads_the_released_gpt_eval(tmp_path):
    source = tmp_path / "gpt_eval.py"
    source.write_bytes(
        subprocess.check_output(["git", "-C", str(MIRROR), "show", "HEAD:challenge/gpt_eval.py"])
    )
    prompt = read_drivelm_prompt(source)
    assert (prompt.temperature, prompt.max_tokens) == (0.6, 3000) and prompt.system
    text = prompt.template
    assert text.index("{GT}") < text.index("{PRED}") and text.endswith("{PRED}")


@needs_java
@pytest.mark.shared
def test_command_over_the_local_judge(shared_drivelm, tmp_path):
    from drivekd.cli import app

    test = read_test(shared_drivelm / "test_eval.json")
    preds = tmp_path / "pred.json"
    rows = [{"id": q.id, "question": q.question, "answer": q.answer} for q in test]
    preds.write_text(json.dumps(rows))
    checkout, _ = _gpt_eval(tmp_path)
    prompt = read_drivelm_prompt(checkout)
    bodies: list[dict] = []
    grader = offline_responder()

    def recording(body: dict) -> tuple[int, str]:
        bodies.append(body)
        return grader(body)

    runner = CliRunner()
    out = tmp_path / "out.json"
    with JudgeServer(recording) as server:
        args = [
            "eval",
            "drivelm",
            str(preds),
            "--test",
            str(shared_drivelm / "test_eval.json"),
            "--out",
            str(out),
        ]
        args += [
            "--judge-base-url",
            server.base_url,
            "--judge-model",
            "gpt-local",
            "--judge-prompts",
            str(checkout),
        ]
        args += ["--cache", str(tmp_path / "cache.sqlite"), "--no-progress"]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    gpt = [q for q in test if 1 in q.tags]
    assert len(bodies) == len(gpt) + sum(3 in q.tags for q in test)
    assert all(b["temperature"] == 0.6 and b["max_tokens"] == 3000 for b in bodies)
    expected = [
        format_check_score("\n".join(m["content"] for m in prompt.messages(q.answer, q.answer))) for q in gpt
    ]
    assert report["chatgpt"] == pytest.approx(sum(expected) / len(expected))
    assert report["match"] == pytest.approx((report["match_f1"] + report["match_gpt"]) / 2)
    assert report["judged"]["chatgpt"] and report["judge"]["provenance"]["temperature"] == 0.6
    assert report["judge"]["provenance"]["rubrics"]["sha256"] == prompt.sha256
    parts = (report["chatgpt"], report["language_score"], report["match"], report["accuracy"])
    assert report["final_score"] == pytest.approx(final_score(*parts))

    result = runner.invoke(app, [*args[:7], "--no-judge"])
    assert result.exit_code == 0, result.output
    bare = json.loads(out.read_text())
    assert bare["chatgpt"] is None and bare["match"] is None and bare["final_score"] is None
    assert bare["accuracy"] == report["accuracy"] and bare["match_f1"] == report["match_f1"]


def test_drivelm_protocol_refuses_another_temperature():
    with pytest.raises(DriveKDError, match=r"temperature 0\.6"):
        JudgeConfig.load(base_url="http://127.0.0.1:1/v1", model="m", protocol="drivelm", temperature=0.0)
