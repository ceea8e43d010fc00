"""One model on one split: greedy predictions, then MCQ accuracy and the judge's scores over HTTP.

A thin composition of :func:`drivekd.evaluation.generate.generate_hf` (batched, greedy, resumable predictions
file) and :func:`drivekd.evaluation.evaluate.score` (strict and DriveBench MCQ accuracy, N judge runs through the
OpenAI client). ``scores.json`` is written last and whole, so its presence marks a finished evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.schema import Sample
from drivekd.demo.workspace import write_json
from drivekd.evaluation.evaluate import score
from drivekd.evaluation.generate import generate_hf
from drivekd.evaluation.judge import JudgeConfig
from drivekd.evaluation.predictions import PredictionWriter, read_predictions
from drivekd.evaluation.server import DEFAULT_MODEL, JudgeServer, offline_responder

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"


def judge_config(base_url: str, runs: int) -> JudgeConfig:
    """The offline grader behind ``base_url``, graded ``runs`` times per answer; no cache, so every run is a call."""
    return JudgeConfig(base_url=base_url, model=DEFAULT_MODEL, runs=runs, cache_path=None)


@contextmanager
def offline_judge(samples: Sequence[Sample]) -> Iterator[str]:
    """Serve the offline rubric grader on a free port of 127.0.0.1 for the lifetime of the block; yields its URL."""
    with JudgeServer(offline_responder(samples)) as server:
        yield server.base_url


def evaluate_model(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    *,
    image_root: Path,
    folder: Path,
    name: str,
    judge: JudgeConfig,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """The score report of ``model`` on ``samples``; reuses ``folder/scores.json`` when an earlier run wrote it."""
    scores = folder / SCORES
    if scores.is_file():
        return json.loads(scores.read_text(encoding="utf-8"))
    predictions = folder / PREDICTIONS
    with PredictionWriter(predictions, model=name) as writer:
        generate_hf(
            samples,
            model.eval(),
            processor,
            writer,
            image_root=image_root,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=False,
        )
    texts = {key: record.prediction for key, record in read_predictions(predictions).items()}
    report = score(samples, texts, model=name, judge=judge, progress=False)
    write_json(scores, report)
    return report
