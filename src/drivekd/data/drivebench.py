"""Import and export the DriveBench flat format: a JSON list of question rows with normalised object tags.

DriveBench scores each row by its ``tag`` (perception 0 = MCQ, 2 = open VQA; prediction 3 = VQA, 0 = unscored
yes/no; planning 1 = VQA; behavior 0 = MCQ), so the exporter derives the tag from a sample's task and kind,
and the importer keeps the upstream one in ``meta["drivebench_tag"]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from drivekd.data.qa import (
    ImportResult,
    Where,
    check_task,
    collect,
    format_options,
    load_json,
    make_sample,
    parse_options,
    require,
    resolve_images,
)
from drivekd.data.schema import Sample
from drivekd.errors import DataError


def import_drivebench(
    path: str | Path, image_root: str | Path, *, skip_invalid: bool = False
) -> ImportResult:
    """Read a DriveBench question (or prediction) file; ``pred`` is kept in ``meta["pred"]`` when present.

    ``image_root`` is the folder that contains ``nuscenes/``. An unusable row raises a :class:`DataError`
    whose row is its list index; with ``skip_invalid`` it is skipped and its error listed in the result
    instead. Ids are ``{scene}_{frame}_{task}_{k}``, ``k`` counting the rows of that frame and task.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        message = f"expected a JSON list of question rows, got {type(data).__name__}"
        raise DataError(
            str(path), None, None, message, hint="pass a DriveBench file, or use the DriveLM importer"
        )
    return collect(_samples(str(path), data, Path(image_root)), skip_invalid=skip_invalid)


def _samples(file: str, rows: list[Any], root: Path) -> Iterator[Sample | DataError]:
    seen: Counter[tuple[str, str, str]] = Counter()
    for index, row in enumerate(rows):
        where = Where(file, index)
        try:
            scene = require(where, row, "scene_token", str)
            frame = require(where, row, "frame_token", str)
            task = check_task(where, "question_type", require(where, row, "question_type", str))
            k = seen[scene, frame, task]
            seen[scene, frame, task] += 1
            meta: dict[str, Any] = {"drivebench_tag": require(where, row, "tag", int)}
            if "pred" in row:
                meta["pred"] = row["pred"]
            yield make_sample(
                where,
                fields=("question", "answer"),
                question=require(where, row, "question", str),
                answer=require(where, row, "answer", str),
                pixel_size=None,
                sample_id=f"{scene}_{frame}_{task}_{k}",
                task=task,
                images=resolve_images(where, "image_path", require(where, row, "image_path", dict), root),
                scene_id=scene,
                frame_id=frame,
                meta=meta,
            )
        except DataError as err:
            yield err


def drivebench_tag(task: str, kind: str) -> int:
    """The DriveBench tag of a task and kind; pairs DriveBench lacks (open behavior) get the task's tag."""
    if task == "perception":
        return 0 if kind == "mcq" else 2
    if task == "prediction":
        return 0 if kind == "yes/no" else 3
    return 1 if task == "planning" else 0


def to_drivebench(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """DriveBench rows for ``samples`` (image paths as stored, relative to the image root).

    An imported DriveBench tag is kept, others follow :func:`drivebench_tag`; an MCQ whose question text does
    not list its options gets them appended, since DriveBench has no separate options field.
    """
    rows = []
    for sample in samples:
        question = sample.question
        if sample.kind == "mcq" and sample.options and parse_options(question) is None:
            question = f"{question} {format_options(sample.options)}"
        row: dict[str, Any] = {
            "scene_token": sample.scene_id,
            "frame_token": sample.frame_id,
            "question_type": sample.task,
            "question": question,
            "answer": sample.answer,
            "tag": sample.meta.get("drivebench_tag", drivebench_tag(sample.task, sample.kind)),
            "image_path": {image.camera: image.path for image in sample.images},
        }
        if "pred" in sample.meta:
            row["pred"] = sample.meta["pred"]
        rows.append(row)
    return rows
