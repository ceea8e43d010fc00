"""Import the DriveLM challenge format (scene -> key frames -> QA groups) as :class:`Sample` rows.

DriveLM tags are pixel centres in 1600x900 frames; they are stored normalised, as DriveBench writes them, so
the model side sees one convention. Ground-truth descriptions of referenced objects are kept for a judge.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivekd.data.qa import (
    TAG_HINT,
    ImportResult,
    Where,
    check_task,
    collect,
    expect,
    load_json,
    make_sample,
    read_tags,
    require,
    resolve_images,
)
from drivekd.data.schema import ImageRef, Sample, Task
from drivekd.data.tags import NUSCENES_SIZE
from drivekd.errors import DataError


def import_drivelm(path: str | Path, image_root: str | Path, *, skip_invalid: bool = False) -> ImportResult:
    """Read a DriveLM file (``test_eval.json``, ``test.json``, ``train_sample.json``, ...).

    ``image_root`` is the folder that contains ``nuscenes/``. An unusable scene, frame or QA item raises a
    :class:`DataError` whose row is its key path (``scene/frame/QA/perception/3``); with ``skip_invalid`` it
    is skipped and its error listed in the result instead.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        message = f"expected a JSON object mapping scene tokens to scenes, got {type(data).__name__}"
        raise DataError(str(path), None, None, message, hint="pass a DriveLM file such as test_eval.json")
    return collect(_samples(str(path), data, Path(image_root)), skip_invalid=skip_invalid)


def _samples(file: str, data: dict[str, Any], root: Path) -> Iterator[Sample | DataError]:
    for scene, scene_data in data.items():
        try:
            frames = require(Where(file, scene), scene_data, "key_frames", dict)
        except DataError as err:
            yield err
            continue
        for frame, frame_data in frames.items():
            yield from _frame_samples(Where(file, f"{scene}/{frame}"), scene, frame, frame_data, root)


def _frame_samples(
    where: Where, scene: str, frame: str, frame_data: Any, root: Path
) -> Iterator[Sample | DataError]:
    try:
        images = resolve_images(where, "image_paths", require(where, frame_data, "image_paths", dict), root)
        groups = require(where, frame_data, "QA", dict)
        infos = _object_infos(where, frame_data.get("key_object_infos", {}))
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
                yield _sample(item_where, item, sample_id, task, images, scene, frame, infos)
            except DataError as err:
                yield err


def _object_infos(where: Where, raw: Any) -> dict[str, Any]:
    """``key_object_infos`` keyed by the normalised tag string, as the samples' ``objects`` print it."""
    infos: dict[str, Any] = {}
    for key, info in expect(where, "key_object_infos", raw, dict).items():
        name = f"key_object_infos.{key}"
        tags = read_tags(where, name, key, NUSCENES_SIZE)
        if len(tags) != 1:
            raise where.error(name, "the key must be exactly one object tag", TAG_HINT)
        infos[str(tags[0])] = expect(where, name, info, dict)
    return infos


def _sample(
    where: Where,
    item: Any,
    sample_id: str,
    task: Task,
    images: list[ImageRef],
    scene: str,
    frame: str,
    infos: dict[str, Any],
) -> Sample:
    question = require(where, item, "Q", str)
    answer = require(where, item, "A", str)
    tag = item.get("tag")
    if tag is not None and not (isinstance(tag, list) and all(isinstance(t, int) for t in tag)):
        raise where.error("tag", f"must be a list of integers, got {tag!r}")
    sample = make_sample(
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
    )
    referenced = {str(obj): infos[str(obj)] for obj in sample.objects if str(obj) in infos}
    if referenced:
        sample.meta["object_infos"] = referenced
    return sample
