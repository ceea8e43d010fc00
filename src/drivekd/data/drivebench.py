"""Import and export the DriveBench flat format: a JSON list of question rows with normalised object tags.

Rows are read as released (``data/drivebench-test.json`` and the corruption files, which have the same fields):
``tag`` is a list of ints (a bare int is accepted), ``image_path`` maps cameras to paths relative to the root of a
DriveBench checkout (``data/nuscenes/samples/...``), kept verbatim so that export writes them back unchanged, and
``pred`` holds a model's answer in a prediction file. The upstream tag is kept in ``meta["drivebench_tag"]``.

The official scorer (``evaluate/eval.py``) routes a row by task and tag: perception 2 -> VQA, else 0 -> MCQ;
prediction 3 -> VQA, else 0 -> no metric (the yes/no questions); planning 1 -> VQA; behavior 0 -> MCQ.
:func:`scored_tag` and :func:`judged` reproduce that routing; they are the one routing table of the project (the
judge's rubric choice, :func:`drivekd.evaluation.rubrics.rubric_for`, is built on them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from drivekd.data.qa import (
    ImportResult,
    Where,
    attach_object_infos,
    check_on_disk,
    check_task,
    collect,
    format_options,
    image_root_of,
    load_json,
    make_sample,
    match_object_info,
    parse_options,
    question_object,
    read_images,
    read_object_infos,
    require,
    require_predictions,
    tag_prefix,
)
from drivekd.data.schema import Sample, Task
from drivekd.errors import DataError

# The tags the official scorer routes each task by, in the order it tests them.
ROUTES: dict[str, tuple[int, ...]] = {
    "perception": (2, 0),
    "prediction": (3, 0),
    "planning": (1,),
    "behavior": (0,),
}


def import_drivebench(
    path: str | Path,
    image_root: str | Path | None,
    *,
    skip_invalid: bool = False,
    text_only: bool = False,
    allow_outside_root: bool = False,
    visual_descriptions: str | Path | None = None,
) -> ImportResult:
    """Read a DriveBench question, corruption or prediction file (``pred`` is kept in ``meta["pred"]``).

    ``image_root`` is the folder the rows' ``image_path`` entries are relative to (the root of a DriveBench
    checkout), and image paths must stay inside it unless ``allow_outside_root``; with ``text_only`` images are
    neither needed nor checked and the samples say so. With
    ``visual_descriptions`` (DriveBench's ``visual_description.json``) each sample gets the infos of the objects
    it references in ``meta["object_infos"]``, matched as upstream matches; a question naming an object the file
    does not describe is an error, since the official judge could not describe it either.

    An unusable row raises a :class:`DataError` whose row is its list index; with ``skip_invalid`` it is skipped
    and its error listed in the result instead. Ids are ``{scene}_{frame}_{task}_{k}``, ``k`` counting the rows
    of that frame and task.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        message = f"expected a JSON list of question rows, got {type(data).__name__}"
        raise DataError(
            str(path), None, None, message, hint="pass a DriveBench file, or use the DriveLM importer"
        )
    root = image_root_of(str(path), image_root, text_only)
    descriptions = None if visual_descriptions is None else _Descriptions(Path(visual_descriptions))
    return collect(
        _samples(str(path), data, root, descriptions, allow_outside_root), skip_invalid=skip_invalid
    )


class _Descriptions:
    """DriveBench's ``visual_description.json``: ``{scene: {key_frames: {frame: {key_object_infos}}}}``,
    each frame's infos read (and checked) when a row of that frame first asks for them."""

    def __init__(self, path: Path) -> None:
        self.file = str(path)
        self.data = load_json(path)
        if not isinstance(self.data, dict):
            raise DataError(
                self.file,
                None,
                None,
                f"expected a JSON object mapping scene tokens to scenes, got {type(self.data).__name__}",
                hint="pass DriveBench's data/visual_description.json",
            )
        self._frames: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def infos(self, scene: str, frame: str) -> dict[str, dict[str, Any]]:
        """The frame's ``key_object_infos`` (empty when the file does not list the frame)."""
        if (scene, frame) not in self._frames:
            frames = (
                self.data.get(scene, {}).get("key_frames", {})
                if isinstance(self.data.get(scene), dict)
                else {}
            )
            entry = frames.get(frame) if isinstance(frames, dict) else None
            where = Where(self.file, f"{scene}/{frame}")
            raw = require(where, entry, "key_object_infos", dict) if entry is not None else {}
            self._frames[scene, frame] = read_object_infos(where, "key_object_infos", raw)
        return self._frames[scene, frame]


def _samples(
    file: str, rows: list[Any], root: Path | None, descriptions: _Descriptions | None, outside: bool
) -> Iterator[Sample | DataError]:
    seen: Counter[tuple[str, str, str]] = Counter()
    for index, row in enumerate(rows):
        where = Where(file, index)
        try:
            scene = require(where, row, "scene_token", str)
            frame = require(where, row, "frame_token", str)
            task = check_task(where, "question_type", require(where, row, "question_type", str))
            k = seen[scene, frame, task]
            seen[scene, frame, task] += 1
            meta: dict[str, Any] = {"drivebench_tag": _read_tag(where, row, task)}
            if "pred" in row:
                meta["pred"] = row["pred"]
            images = read_images(where, "image_path", require(where, row, "image_path", dict))
            if root is not None:
                check_on_disk(where, "image_path", images, root, allow_outside_root=outside)
            sample = make_sample(
                where,
                fields=("question", "answer"),
                question=require(where, row, "question", str),
                answer=require(where, row, "answer", str),
                pixel_size=None,
                sample_id=f"{scene}_{frame}_{task}_{k}",
                task=task,
                images=images,
                scene_id=scene,
                frame_id=frame,
                meta=meta,
                text_only=root is None,
            )
            if descriptions is not None:
                _describe(where, sample, descriptions)
        except DataError as err:
            yield err
            continue
        yield sample


def _read_tag(where: Where, row: dict[str, Any], task: Task) -> list[int]:
    """The row's tag as a list; it must hold a tag the official scorer routes the task by."""
    if "tag" not in row:
        raise where.error("tag", "missing field 'tag'")
    raw = row["tag"]
    tags = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(tags, list) or not tags or not all(type(t) is int for t in tags):
        raise where.error("tag", f"must be a list of integers such as [0], got {raw!r}")
    if not set(tags) & set(ROUTES[task]):
        expected = " or ".join(f"[{t}]" for t in ROUTES[task])
        raise where.error(
            "tag", f"DriveBench scores no {task} row with tag {tags}", hint=f"a {task} row has tag {expected}"
        )
    return tags


def _describe(where: Where, sample: Sample, descriptions: _Descriptions) -> None:
    """Attach the frame's object infos; the question's first object, which upstream's judge is told about, must
    have one."""
    infos = descriptions.infos(sample.scene_id, sample.frame_id)
    attach_object_infos(sample, infos)
    first = question_object(sample.question)
    if first is not None and match_object_info(first, infos) is None:
        raise where.error(
            "question",
            f"{descriptions.file} describes no object {tag_prefix(first)},...> in this frame",
            hint="pass the visual_description.json of the same DriveBench release, or --skip-invalid",
        )


def drivebench_tags(sample: Sample) -> list[int] | None:
    """The upstream tag of ``sample`` as a list (``meta["drivebench_tag"]``: a list as released, or an int in
    JSONL written before tags were lists); ``None`` for a sample that has none (synthetic, DriveLM)."""
    tag = sample.meta.get("drivebench_tag")
    if tag is None:
        return None
    return [int(t) for t in tag] if isinstance(tag, list | tuple) else [int(tag)]


def scored_tag(sample: Sample) -> int | None:
    """The tag the official scorer routes ``sample`` by (see the module docstring): the first of the task's
    :data:`ROUTES` among :func:`drivebench_tags`; a sample without a tag gets :func:`drivebench_tag` of its task
    and kind. ``None`` when the tag has no route.
    """
    tags = drivebench_tags(sample)
    if tags is None:
        return drivebench_tag(sample.task, sample.kind)
    return next((t for t in ROUTES[sample.task] if t in tags), None)


def judged(sample: Sample) -> bool:
    """Whether the official scorer judges ``sample``: every routed row but prediction tag 0 (its yes/no
    questions, which it imports but scores with no metric; Drive-KD counts them in the report)."""
    tag = scored_tag(sample)
    return tag is not None and not (sample.task == "prediction" and tag == 0)


def drivebench_tag(task: str, kind: str) -> int:
    """The DriveBench tag of a task and kind; pairs DriveBench lacks (open behavior) get the task's tag."""
    if task == "perception":
        return 0 if kind == "mcq" else 2
    if task == "prediction":
        return 0 if kind == "yes/no" else 3
    return 1 if task == "planning" else 0


def to_drivebench(
    samples: Iterable[Sample], predictions: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """DriveBench rows for ``samples``: fields in the release's order, ``tag`` a list, image paths as stored.

    An imported DriveBench tag is kept, others follow :func:`drivebench_tag`; an MCQ whose question text does
    not list its options gets them appended, since DriveBench has no separate options field. With
    ``predictions`` (sample id -> answer) every row gets its ``pred``, the official evaluator's input; otherwise
    an imported ``pred`` is written back.
    """
    samples = list(samples)
    if predictions is not None:
        require_predictions(samples, predictions)
    rows = []
    for sample in samples:
        question = sample.question
        if sample.kind == "mcq" and sample.options and parse_options(question) is None:
            question = f"{question} {format_options(sample.options)}"
        tags = drivebench_tags(sample) or [drivebench_tag(sample.task, sample.kind)]
        row: dict[str, Any] = {
            "scene_token": sample.scene_id,
            "frame_token": sample.frame_id,
            "question_type": sample.task,
            "question": question,
            "answer": sample.answer,
            "tag": tags,
            "image_path": {image.camera: image.path for image in sample.images},
        }
        if predictions is not None:
            row["pred"] = predictions[sample.id]
        elif "pred" in sample.meta:
            row["pred"] = sample.meta["pred"]
        rows.append(row)
    return rows
