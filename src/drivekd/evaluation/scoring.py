"""Match predictions to samples and compute the answer-extraction scores (MCQ letters, yes/no).

Every sample is kept: a sample with no prediction is counted as missing, scored wrong (0) everywhere, and listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivekd.data.schema import Sample
from drivekd.errors import DataError
from drivekd.evaluation.choices import ChoiceMode, extract_choice, extract_yes_no
from drivekd.evaluation.judge import JudgeTask
from drivekd.evaluation.prompts import DriveBenchPrompts
from drivekd.evaluation.rubrics import (
    RUBRICS,
    build_judge_messages,
    describe_objects,
    ground_truth_text,
    rubric_for,
    visual_description,
)

OVERALL = "overall"


@dataclass(frozen=True)
class EvalItem:
    """A sample, its prediction (``None`` when missing) and the rubric that judges it (``None``: not judged)."""

    sample: Sample
    prediction: str | None
    rubric: str | None

    @property
    def image_key(self) -> str:
        """The visual input of the question: its set of image paths (one key per frame and camera setting)."""
        return "|".join(sorted(image.path for image in self.sample.images))


def embedded_predictions(samples: Sequence[Sample]) -> dict[str, str]:
    """Prediction texts carried by the samples themselves: a DriveBench prediction file's ``pred`` fields."""
    return {s.id: str(s.meta["pred"]) for s in samples if "pred" in s.meta}


def join(samples: Iterable[Sample], predictions: Mapping[str, str]) -> tuple[list[EvalItem], list[str]]:
    """Items for every sample, and the ids of predictions that match no sample (reported, not scored)."""
    items = [EvalItem(s, predictions.get(s.id), rubric_for(s)) for s in samples]
    known = {item.sample.id for item in items}
    return items, sorted(set(predictions) - known)


def judge_tasks(items: Iterable[EvalItem], prompts: DriveBenchPrompts | None = None) -> list[JudgeTask]:
    """One judge task per judged item that has a prediction (missing ones are scored 0 without a call).

    Without ``prompts`` the messages are our rubric prompts; with them, DriveBench's own (:func:`drivebench_messages`).
    """
    tasks = []
    for item in items:
        if item.rubric is None or item.prediction is None:
            continue
        s = item.sample
        if prompts is not None:
            messages = drivebench_messages(s, item.rubric, item.prediction, prompts)
        else:
            messages = build_judge_messages(
                RUBRICS[item.rubric],
                sample_id=s.id,
                question=s.question,
                ground_truth=ground_truth_text(s),
                objects=describe_objects(s),
                prediction=item.prediction,
            )
        tasks.append(JudgeTask(s.id, item.rubric, messages))
    return tasks


def drivebench_messages(
    sample: Sample, rubric: str, prediction: str, prompts: DriveBenchPrompts
) -> list[dict[str, str]]:
    """The request DriveBench's evaluator sends: one user message, its system text and the filled template
    (question, ground-truth answer, prediction and, where the question names an object, its visual description)."""
    try:
        desc = visual_description(sample, prompts.fixed_descriptions)
    except KeyError as err:
        raise DataError(
            f"sample {sample.id}",
            None,
            "meta.object_infos",
            f"no visual description for the object {err.args[0]}...>",
            hint="import the DriveBench file with --visual-descriptions (its visual_description.json)",
        ) from None
    values = {"GT": sample.answer, "PRED": prediction, "QUESTION": sample.question}
    if desc:
        values["DESC"] = desc
    try:
        text = prompts.templates[rubric].format(**values)
    except (KeyError, IndexError, ValueError) as err:
        need = "a visual description (import with --visual-descriptions)" if "DESC" in str(err) else str(err)
        raise DataError(
            prompts.path,
            None,
            rubric,
            f"the template cannot be filled for sample {sample.id}: it needs {need}",
            hint="check the --judge-prompts file",
        ) from None
    content = "\n".join(part for part in (prompts.system, text) if part)
    return [{"role": "user", "content": content}]


def _accuracy(rows: list[tuple[str, str | None, str, bool]]) -> dict[str, Any]:
    """Counts per task and overall from (task, extracted answer, truth, missing) rows."""
    out: dict[str, Any] = {}
    for task in [*sorted({r[0] for r in rows}), OVERALL]:
        chosen = [r for r in rows if task in (OVERALL, r[0])]
        correct = sum(found == truth for _, found, truth, _ in chosen)
        out[task] = {
            "correct": correct,
            "total": len(chosen),
            "unparsed": sum(found is None and not missing for _, found, _, missing in chosen),
            "missing": sum(missing for *_, missing in chosen),
            "accuracy": 100.0 * correct / len(chosen) if chosen else None,
        }
    return out


def choice_accuracy(items: Iterable[EvalItem], mode: ChoiceMode) -> dict[str, Any]:
    """MCQ accuracy (%) per task and overall with letters read in ``mode``; unparsed and missing count as wrong."""
    rows = [
        (i.sample.task, extract_choice(i.prediction, mode), i.sample.answer, i.prediction is None)
        for i in items
        if i.sample.kind == "mcq"
    ]
    return _accuracy(rows)


def yes_no_accuracy(items: Iterable[EvalItem]) -> dict[str, Any]:
    """Accuracy (%) of yes/no questions per task and overall."""
    rows = [
        (
            i.sample.task,
            extract_yes_no(i.prediction),
            extract_yes_no(i.sample.answer) or "",
            i.prediction is None,
        )
        for i in items
        if i.sample.kind == "yes/no"
    ]
    return _accuracy(rows)
