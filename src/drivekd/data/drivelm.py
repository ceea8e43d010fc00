"""Import the DriveLM challenge format (scene -> key frames -> QA groups) as :class:`Sample` rows, and write
predictions as a DriveLM challenge submission.

DriveLM tags are pixel centres in 1600x900 frames; they are stored normalised, as DriveBench writes them, so
the model side sees one convention. Ground-truth descriptions of referenced objects are kept for a judge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from drivekd.data.qa import (
    ImportResult,
    Where,
    attach_object_infos,
    check_on_disk,
    check_task,
    collect,
    expect,
    image_root_of,
    load_json,
    make_sample,
    read_images,
    read_object_infos,
    require,
    require_predictions,
)
from drivekd.data.schema import ImageRef, Sample, Task
from drivekd.data.tags import NUSCENES_SIZE, pixel_tags_in_text
from drivekd.errors import DataError

# The order in which the challenge concatenates a key frame's QA groups to number its questions.
CHALLENGE_ORDER: tuple[Task, ...] = ("perception", "prediction", "planning", "behavior")


def import_drivelm(
    path: str | Path,
    image_root: str | Path | None,
    *,
    skip_invalid: bool = False,
    text_only: bool = False,
    allow_outside_root: bool = False,
) -> ImportResult:
    """Read a DriveLM file (``test_eval.json``, ``test.json``, ``train_sample.json``, ...).

    ``image_root`` is the folder that contains ``nuscenes/``; with ``text_only`` images are neither needed nor
    checked and the samples say so; image paths must stay inside the root unless ``allow_outside_root``. An unusable scene, frame or QA item raises a :class:`DataError` whose row is
    its key path (``scene/frame/QA/perception/3``); with ``skip_invalid`` it is skipped and its error listed in
    the result instead.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        message = f"expected a JSON object mapping scene tokens to scenes, got {type(data).__name__}"
        raise DataError(str(path), None, None, message, hint="pass a DriveLM file such as test_eval.json")
    root = image_root_of(str(path), image_root, text_only)
    return collect(_samples(str(path), data, root, allow_outside_root), skip_invalid=skip_invalid)


def _stored_path(path: str) -> str:
    """A DriveLM image path cut to start at its ``nuscenes/`` folder, so it is relative to the image root
    whether DriveLM wrote ``../nuscenes/samples/...`` or an absolute path.
    """
    parts = PurePosixPath(path).parts
    return "/".join(parts[parts.index("nuscenes") :]) if "nuscenes" in parts else path


def _samples(
    file: str, data: dict[str, Any], root: Path | None, outside: bool
) -> Iterator[Sample | DataError]:
    for scene, scene_data in data.items():
        try:
            frames = require(Where(file, scene), scene_data, "key_frames", dict)
        except DataError as err:
            yield err
            continue
        for frame, frame_data in frames.items():
            yield from _frame_samples(
                Where(file, f"{scene}/{frame}"), scene, frame, frame_data, root, outside
            )


def _frame_samples(
    where: Where, scene: str, frame: str, frame_data: Any, root: Path | None, outside: bool
) -> Iterator[Sample | DataError]:
    try:
        paths = require(where, frame_data, "image_paths", dict)
        images = read_images(where, "image_paths", paths, stored=_stored_path)
        if root is not None:
            check_on_disk(where, "image_paths", images, root, allow_outside_root=outside)
        groups = require(where, frame_data, "QA", dict)
        infos = read_object_infos(where, "key_object_infos", frame_data.get("key_object_infos", {}))
    except DataError as err:
        yield err
        return
    for group, items in groups.items():
        try:
            task = check_task(where, f"QA.{group}", group)
            expect(where, f"QA.{group}", items, list)
        except DataError as err:
            yield err
            continue
        for k, item in enumerate(items):
            item_where = Where(where.file, f"{where.row}/QA/{group}/{k}")
            sample_id = f"{scene}_{frame}_{task}_{k}"
            try:
                sample = _sample(item_where, item, sample_id, task, images, scene, frame, root is None)
            except DataError as err:
                yield err
                continue
            attach_object_infos(sample, infos)
            yield sample


def _sample(
    where: Where,
    item: Any,
    sample_id: str,
    task: Task,
    images: list[ImageRef],
    scene: str,
    frame: str,
    text_only: bool,
) -> Sample:
    question = require(where, item, "Q", str)
    answer = require(where, item, "A", str)
    tag = item.get("tag")
    if tag is not None and not (isinstance(tag, list) and all(isinstance(t, int) for t in tag)):
        raise where.error("tag", f"must be a list of integers, got {tag!r}")
    return make_sample(
        where,
        fields=("Q", "A"),
        question=question,
        answer=answer,
        pixel_size=NUSCENES_SIZE,
        sample_id=sample_id,
        task=task,
        images=images,
        scene_id=scene,
        frame_id=frame,
        meta={} if tag is None else {"drivelm_tag": tag},
        text_only=text_only,
    )


def challenge_ids(samples: Sequence[Sample]) -> dict[str, str]:
    """Sample id -> DriveLM challenge id ``{scene}_{frame}_{index}``.

    As the challenge numbers them, ``index`` counts a key frame's questions over its perception, prediction,
    planning and behavior groups in that order, each group in the order the samples are given (file order for
    imported ones). A sample without a scene or frame token has no challenge id: :class:`DataError`.
    """
    frames: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        if not sample.scene_id or not sample.frame_id:
            raise DataError(
                "<samples>",
                sample.id,
                "scene_id" if not sample.scene_id else "frame_id",
                "a DriveLM challenge id needs the scene and frame tokens",
                hint="export samples imported from DriveLM or DriveBench",
            )
        frames.setdefault((sample.scene_id, sample.frame_id), []).append(sample)
    ids: dict[str, str] = {}
    for (scene, frame), members in frames.items():
        ordered = sorted(
            members, key=lambda s: CHALLENGE_ORDER.index(s.task)
        )  # stable: file order within a task
        ids.update({s.id: f"{scene}_{frame}_{k}" for k, s in enumerate(ordered)})
    return ids


def to_drivelm_submission(samples: Sequence[Sample], predictions: Mapping[str, str]) -> list[dict[str, str]]:
    """The challenge's prediction file ``[{id, question, answer}]`` for ``samples`` answered in ``predictions``.

    Tags are written back in pixels, as the challenge's matcher reads them. Every sample needs a prediction (the
    official evaluator looks each test question up): a missing one is a :class:`DataError`.
    """
    samples = list(samples)
    require_predictions(samples, predictions)
    ids = challenge_ids(samples)
    return [
        {
            "id": ids[s.id],
            "question": pixel_tags_in_text(s.question),
            "answer": pixel_tags_in_text(predictions[s.id]),
        }
        for s in samples
    ]
