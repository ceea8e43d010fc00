"""`drivekd eval drivelm`: the DriveLM challenge's scoring (OpenDriveLab/DriveLM ``challenge/evaluation.py``).

Questions are walked per key frame in the challenge's order (perception, prediction, planning, behavior; a
question's id is ``{scene}_{frame}_{index}`` over that order). The graph filter: the first question of a frame
always counts and sets the frame's matched objects (the ground-truth coordinates its answer matched); a later
question counts only if every coordinate it mentions is one of them. Counted questions are routed by tag:

- 0: accuracy, the share of answers exactly equal to the ground truth (a fraction 0-1);
- 1: GPT score, the challenge's own prompt through the judge at temperature 0.6, the reply read as a bare number;
- 2: language metrics, BLEU-1..4, ROUGE-L and CIDEr from ``pycocoevalcap`` with its PTB tokenizer (Java);
- 3: match, the mean of the coordinate-match F1 (x100) and the GPT score.

Coordinates are the ``\\d+\\.\\d+`` numbers of a text taken in pairs, in the challenge's 1600x900 pixel units; a
predicted pair matches the closest remaining ground-truth pair when their L1 distance is under 16 pixels. The final
score is 0.4 GPT/100 + 0.2 language + 0.2 match/100 + 0.2 accuracy, with language = mean(BLEU-1..4)/3 + ROUGE-L/3
+ CIDEr/30. Where upstream would crash (a missing prediction, an empty tag group) this scorer counts the item as a
wrong answer or 0, lists it, and leaves a component with no questions ``null`` (and then the final score too). A GPT
reply that is not a number and a failed call are not grades: they are left out of the GPT means (each run's mean is
over the questions it graded), counted per part and listed, so a judge outage never shows as a score of 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from drivekd.data.tags import pixel_tags_in_text
from drivekd.errors import DataError, DriveKDError
from drivekd.evaluation.aggregate import accounting, run_stats, status_counts
from drivekd.evaluation.evaluate import provenance
from drivekd.evaluation.judge import JudgeConfig, JudgeResult, JudgeTask, public_config, run_judge
from drivekd.evaluation.predictions import read_predictions
from drivekd.evaluation.prompts import DriveLMPrompt

GROUPS = ("perception", "prediction", "planning", "behavior")
MATCH_PIXELS = 16.0
WEIGHTS = {"chatgpt": 0.4, "language": 0.2, "match": 0.2, "accuracy": 0.2}
LANGUAGE_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
_NUMBER = re.compile(r"\d+\.\d+")
_EPS = 1e-8  # the challenge's smoothing of precision, recall and F1
Point = tuple[float, float]


@dataclass(frozen=True)
class ChallengeQA:
    """One question of a challenge test file, with its challenge id."""

    id: str
    scene: str
    frame: str
    group: str
    k: int  # index within its group
    question: str
    answer: str
    tags: tuple[int, ...]

    @property
    def sample_id(self) -> str:
        """Our id of the same question, as the DriveLM importer writes it: ``{scene}_{frame}_{group}_{k}``."""
        return f"{self.scene}_{self.frame}_{self.group}_{self.k}"


def _walk(test: Mapping[str, Any], file: str) -> list[ChallengeQA]:
    out = []
    for scene, scene_data in test.items():
        frames = scene_data.get("key_frames") if isinstance(scene_data, dict) else None
        if not isinstance(frames, dict):
            raise DataError(
                file, scene, "key_frames", "missing or not an object", hint="pass a DriveLM test file"
            )
        for frame, frame_data in frames.items():
            groups = frame_data.get("QA") if isinstance(frame_data, dict) else None
            if not isinstance(groups, dict):
                raise DataError(
                    file,
                    f"{scene}/{frame}",
                    "QA",
                    "missing or not an object",
                    hint="pass a DriveLM test file",
                )
            index = 0
            for group in GROUPS:
                for k, item in enumerate(groups.get(group) or []):
                    where = f"{scene}/{frame}/QA/{group}/{k}"
                    if not isinstance(item, dict) or not all(
                        isinstance(item.get(f), str) for f in ("Q", "A")
                    ):
                        raise DataError(
                            file,
                            where,
                            "Q/A",
                            "a question needs text fields Q and A",
                            hint="fix the test file",
                        )
                    tags = item.get("tag")
                    if not isinstance(tags, list) or not all(isinstance(t, int) for t in tags):
                        raise DataError(
                            file,
                            where,
                            "tag",
                            f"must be a list of integers, got {tags!r}",
                            hint="fix the test file",
                        )
                    qa_id = f"{scene}_{frame}_{index}"
                    out.append(ChallengeQA(qa_id, scene, frame, group, k, item["Q"], item["A"], tuple(tags)))
                    index += 1
    return out


def read_test(path: str | Path) -> list[ChallengeQA]:
    """The questions of a DriveLM challenge test file (``test.json`` / ``test_eval.json`` layout)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(
            str(path), None, None, f"cannot read it as JSON ({err})", hint="pass the challenge test file"
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            str(path), None, None, "expected an object of scenes", hint="pass the challenge test file"
        )
    return _walk(data, str(path))


def read_challenge_predictions(path: str | Path, test: Sequence[ChallengeQA]) -> dict[str, str]:
    """Answers by challenge id from a challenge prediction file (``[{id, question, answer}]``, or a submission
    with them under ``results``) or from our predictions JSONL (our sample ids mapped, tags back in pixels)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        by_ours = {qa.sample_id: qa.id for qa in test}
        records = read_predictions(path)
        unknown = sorted(set(records) - set(by_ours))
        if unknown and len(unknown) == len(records):
            raise DataError(
                str(path),
                None,
                "id",
                f"no prediction id is a question of the test file (first: {unknown[0]!r})",
                hint="score predictions made on the DriveLM import of this test file",
            )
        return {by_ours[k]: pixel_tags_in_text(r.prediction) for k, r in records.items() if k in by_ours}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(
            str(path),
            None,
            None,
            f"cannot read it as JSON ({err})",
            hint="pass [{id, question, answer}] or our predictions .jsonl",
        ) from None
    rows = data.get("results") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise DataError(
            str(path),
            None,
            None,
            "expected a list of {id, question, answer}",
            hint="pass the challenge's prediction format",
        )
    answers: dict[str, str] = {}
    for k, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("id"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise DataError(
                str(path),
                k,
                "id/answer",
                "each row needs a text id and answer",
                hint="fix the prediction file",
            )
        if row["id"] in answers:
            raise DataError(
                str(path), k, "id", f"id {row['id']!r} is repeated", hint="keep one answer per question"
            )
        answers[row["id"]] = row["answer"]
    return answers


def coordinates(text: str) -> list[Point]:
    """The text's ``\\d+\\.\\d+`` numbers in pairs (an odd last number is dropped, as the challenge does)."""
    numbers = [float(n) for n in _NUMBER.findall(text)]
    numbers = numbers[: len(numbers) - len(numbers) % 2]
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


def match_result(answer: str, truth: str) -> tuple[list[Point], float]:
    """Greedy coordinate matching: each predicted pair, in order, takes the closest ground-truth pair still
    unmatched (L1 distance, first on ties) when it is under 16 pixels. Returns the matched ground-truth pairs and
    the F1 (0-1) of the matches, smoothed by 1e-8 as upstream."""
    remaining = coordinates(truth)
    total = len(remaining)
    matched: list[Point] = []
    false_positives = 0
    for px, py in coordinates(answer):
        best, distance = None, math.inf
        for k, (gx, gy) in enumerate(remaining):
            d = abs(px - gx) + abs(py - gy)
            if d < distance:
                best, distance = k, d
        if best is not None and distance < MATCH_PIXELS:
            matched.append(remaining.pop(best))
        else:
            false_positives += 1
    tp = len(matched)
    precision = tp / (tp + false_positives + _EPS)
    recall = tp / (tp + (total - tp) + _EPS)
    return matched, 2 * precision * recall / (precision + recall + _EPS)


def graph_filter(test: Sequence[ChallengeQA], answers: Mapping[str, str]) -> list[ChallengeQA]:
    """The questions that count: per frame the first, and later ones whose every coordinate was matched by it."""
    counted = []
    graph: list[Point] = []
    frame = None
    for qa in test:
        if (qa.scene, qa.frame) != frame:
            frame = (qa.scene, qa.frame)
            graph, _ = match_result(answers.get(qa.id, ""), qa.answer)
            counted.append(qa)
        elif all(point in graph for point in coordinates(qa.question)):
            counted.append(qa)
    return counted


def language_metrics(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of (answer, ground truth) pairs with pycocoevalcap, PTB-tokenised (Java)."""
    if shutil.which("java") is None:
        raise DriveKDError(
            "the DriveLM language metrics need Java for the PTB tokenizer of pycocoevalcap: install a JRE "
            "(apt-get install -y default-jre-headless); no other tokenizer is substituted"
        )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # As the challenge's wrapper (language_evaluation.CocoEvaluator): "_UNK" in references is renamed.
    truths = {k: [{"caption": t.replace("_UNK", "_UNKNOWN")}] for k, (_, t) in enumerate(pairs)}
    answers = {k: [{"caption": a}] for k, (a, _) in enumerate(pairs)}
    with contextlib.redirect_stdout(io.StringIO()):
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(truths), tokenizer.tokenize(answers)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return dict(zip(LANGUAGE_METRICS, [*map(float, bleu), float(rouge), float(cider)], strict=True))


def language_score(language: Mapping[str, float]) -> float:
    """The challenge's language part: mean BLEU-1..4 / 3 + ROUGE-L / 3 + CIDEr / 10 / 3."""
    bleu = sum(language[f"Bleu_{n}"] for n in range(1, 5)) / 4.0
    return bleu / 3.0 + language["ROUGE_L"] / 3.0 + language["CIDEr"] / 10.0 / 3.0


def final_score(
    chatgpt: float | None, language: float | None, match: float | None, accuracy: float | None
) -> float | None:
    """0.4 chatgpt/100 + 0.2 language + 0.2 match/100 + 0.2 accuracy; ``None`` when a part is missing."""
    parts = {"chatgpt": chatgpt, "language": language, "match": match, "accuracy": accuracy}
    if any(v is None for v in parts.values()):
        return None
    scale = {"chatgpt": 100.0, "language": 1.0, "match": 100.0, "accuracy": 1.0}
    return sum(WEIGHTS[k] * float(v) / scale[k] for k, v in parts.items())  # type: ignore[arg-type]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _gpt_runs(
    ids: Sequence[str], answered: set[str], results: Sequence[JudgeResult], runs: int
) -> list[float | None]:
    """Per run, the mean GPT score over the questions it graded: a question without an answer scores 0 (no call),
    an unparsed reply or a failed call is left out; ``None`` for a run that graded none of ``ids``."""
    scores = {(r.sample_id, r.run): r.score for r in results if r.status == "ok"}
    out: list[float | None] = []
    for run in range(runs):
        graded = [
            scores[i, run] if i in answered else 0.0 for i in ids if i not in answered or (i, run) in scores
        ]
        out.append(sum(graded) / len(graded) if graded else None)
    return out


def score_drivelm(
    test: Sequence[ChallengeQA],
    answers: Mapping[str, str],
    *,
    judge: JudgeConfig | None = None,
    prompt: DriveLMPrompt | None = None,
    client: openai.AsyncOpenAI | None = None,
    language: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The challenge's scores of ``answers`` (by challenge id); GPT parts are null without ``judge``."""
    known = {qa.id for qa in test}
    counted = graph_filter(test, answers)
    missing = [qa.id for qa in counted if qa.id not in answers]
    by_tag = {t: [qa for qa in counted if t in qa.tags] for t in range(4)}
    answer = {qa.id: answers.get(qa.id, "") for qa in counted}

    accuracy = _mean([float(answer[qa.id] == qa.answer) for qa in by_tag[0]])
    match_f1 = _mean([100.0 * match_result(answer[qa.id], qa.answer)[1] for qa in by_tag[3]])
    lang = (
        language_metrics([(answer[qa.id], qa.answer) for qa in by_tag[2]]) if language and by_tag[2] else None
    )
    report: dict[str, Any] = {
        "questions": len(test),
        "counted_questions": len(counted),
        "filtered_out": len(test) - len(counted),
        "per_tag": {
            "accuracy": len(by_tag[0]),
            "chatgpt": len(by_tag[1]),
            "language": len(by_tag[2]),
            "match": len(by_tag[3]),
        },
        "accuracy": accuracy,
        "language": lang,
        "language_score": language_score(lang) if lang else None,
        "match_f1": match_f1,
        "chatgpt": None,
        "match_gpt": None,
        "match": None,
        # Which parts a judge graded: only the GPT score and the GPT half of the match score ever are.
        "judged": {"accuracy": False, "language": False, "match_f1": False, "chatgpt": False, "match": False},
        "missing_predictions": missing,
        "unknown_predictions": sorted(set(answers) - known),
    }
    if judge is not None:
        if prompt is None:
            raise DriveKDError("the DriveLM GPT score needs the challenge's prompt: pass --judge-prompts")
        asked = {qa.id: qa for qa in [*by_tag[1], *by_tag[3]] if qa.id in answers}
        tasks = [
            JudgeTask(i, "drivelm_gpt", prompt.messages(qa.answer, answers[i])) for i, qa in asked.items()
        ]
        results = run_judge(tasks, judge, client=client, progress=progress)
        counts: dict[str, Any] = status_counts(results)
        counts["per_part"] = {}
        for tag, name in ((1, "chatgpt"), (3, "match_gpt")):
            ids = [qa.id for qa in by_tag[tag]]
            runs = _gpt_runs(ids, set(asked), results, judge.runs) if ids else []
            report[name], report[f"{name}_runs"] = run_stats(runs)["mean"] if runs else None, runs
            counts["per_part"][name] = status_counts(r for r in results if r.sample_id in set(ids))
        if report["match_f1"] is not None and report["match_gpt"] is not None:
            report["match"] = (report["match_f1"] + report["match_gpt"]) / 2.0
        report["judged"].update(chatgpt=True, match=True)
        report["judge"] = {
            "config": public_config(judge),
            "provenance": provenance(judge, prompt),
            "counts": counts,
            "failures": [
                {"id": r.sample_id, "run": r.run, "status": r.status, "error": r.error}
                for r in results
                if r.status != "ok"
            ],
            "accounting": accounting(results),
        }
    report["final_score"] = final_score(
        report["chatgpt"], report["language_score"], report["match"], accuracy
    )
    return report
