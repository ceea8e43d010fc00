"""What the importers share: loading, field checks, images, options, kinds, tags and object infos.

DriveLM, DriveBench and the Drive-KD release carry the same question/answer items in different layouts, so all but
walking the layout lives here once; each importer only names its own fields, so a :class:`DataError` points into
the upstream file. Images that are not on disk are counted over the whole file before the import stops, so the
error says how many are missing and which layout the image root should have.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

from pydantic import ValidationError

from drivekd.data.cameras import CAMERAS, check_camera
from drivekd.data.images import OUTSIDE_ROOT_HINT, ImageFileError
from drivekd.data.schema import OPTION_LETTERS, TASK_TO_CAPABILITY, ImageRef, Kind, Sample, Task
from drivekd.data.tags import NUSCENES_SIZE, ObjectTag, normalise_tags_in_text, parse_tags
from drivekd.errors import DataError

OPTIONS_PROMPT = "Please select the correct answer from the following options:"
_OPTIONS_RE = re.compile(r"from the following options\s*:", re.IGNORECASE)
# An option starts with its letter and a dot, at the start or after whitespace ("... A. Going ahead. B. ...").
_OPTION_START_RE = re.compile(r"(?<!\S)([A-D])\.\s")
_YES_NO_RE = re.compile(r"(yes|no)\.?", re.IGNORECASE)
_JSON_TYPES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
TAG_HINT = "write object tags as <cK,CAM_NAME,x,y> with a nuScenes camera name"


@dataclass
class ImportResult:
    """The samples of an imported file and, with ``skip_invalid``, the errors of the skipped rows."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)


@dataclass(frozen=True)
class Where:
    """A row of an upstream file (a list index or a key path), to build a :class:`DataError` naming it."""

    file: str
    row: int | str | None

    def error(self, field: str | None, message: str, hint: str | None = None) -> DataError:
        if hint is None:
            return DataError(self.file, self.row, field, message)
        return DataError(self.file, self.row, field, message, hint)


@dataclass
class MissingImages(DataError):
    """A row whose images are not on disk: ``paths`` as resolved, ``stored`` the first as the file writes it."""

    paths: tuple[str, ...] = ()
    stored: str = ""


def collect(items: Iterable[Sample | DataError], *, skip_invalid: bool) -> ImportResult:
    """Gather an importer's samples; an error is raised unless ``skip_invalid``, which records it instead.

    Rows with missing images are all read first, then one error reports them together
    (:func:`missing_images_error`).
    """
    result = ImportResult()
    missing: list[MissingImages] = []
    for item in items:
        if isinstance(item, Sample):
            result.samples.append(item)
        elif skip_invalid:
            result.errors.append(item)
        elif isinstance(item, MissingImages):
            missing.append(item)
        elif not missing:
            raise item
    if missing:
        raise missing_images_error(missing)
    return result


def image_layout(stored: str) -> str:
    """The folder layout a stored image path asks of the image root, e.g. ``data/nuscenes/samples/<CAMERA>/<image>.jpg``."""
    path = PurePosixPath(stored)
    parts = ["<CAMERA>" if part in CAMERAS else part for part in path.parts[:-1]]
    return "/".join([*parts, f"<image>{path.suffix}"])


def missing_images_error(missing: list[MissingImages]) -> DataError:
    """One error for every row whose images are missing: how many, the first path and the expected layout."""
    first = missing[0]
    count = len({path for row in missing for path in row.paths})
    message = f"{count} images are not on disk ({len(missing)} rows); the first is {first.paths[0]}"
    hint = (
        f"--image-root must be the folder the file's image paths are relative to, so that it holds "
        f"{image_layout(first.stored)} as the file writes {first.stored!r}; pass --text-only to import the "
        "rows without images, or --skip-invalid to skip them"
    )
    return DataError(first.file, first.row, first.field, message, hint)


def image_root_of(file: str, image_root: str | Path | None, text_only: bool) -> Path | None:
    """The folder an import checks images under; ``None`` for a text-only import, which needs none."""
    if text_only:
        return None
    if image_root is None:
        raise DataError(
            file,
            None,
            None,
            "no image root given",
            hint="pass --image-root, or --text-only to import without images",
        )
    return Path(image_root)


def load_json(path: Path) -> Any:
    """The parsed content of ``path``; a file that is not JSON is a :class:`DataError` with no row."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(
            str(path), None, None, f"not valid JSON: {err}", hint="repair or re-export it"
        ) from None


def expect(where: Where, name: str, value: Any, kind: type) -> Any:
    """``value`` when it has the JSON type ``kind``, else a :class:`DataError` on field ``name``."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise where.error(name, f"must be {_JSON_TYPES[kind]}, got {type(value).__name__}")
    return value


def require(where: Where, row: Any, name: str, kind: type) -> Any:
    """Field ``name`` of the JSON object ``row``, checked to be present and of type ``kind``."""
    if not isinstance(row, dict):
        raise where.error("<row>", f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise where.error(name, f"missing field {name!r}")
    return expect(where, name, row[name], kind)


def check_task(where: Where, name: str, task: str) -> Task:
    """``task`` when it is one of the four DriveBench/DriveLM tasks."""
    if task not in TASK_TO_CAPABILITY:
        raise where.error(name, f"unknown task {task!r}; expected one of {', '.join(TASK_TO_CAPABILITY)}")
    return cast(Task, task)


def read_images(
    where: Where, name: str, paths: dict[str, Any], *, stored: Callable[[str], str] = str
) -> list[ImageRef]:
    """The images of the camera -> path mapping in field ``name``, in :data:`CAMERAS` order.

    ``stored`` maps an upstream path to the one kept in the sample (the identity keeps it verbatim).
    """
    if not paths:
        raise where.error(name, "no images", hint="list at least one camera image")
    images: dict[str, ImageRef] = {}
    for camera, path in paths.items():
        field_name = f"{name}.{camera}"
        try:
            canonical = check_camera(camera)
        except ValueError as err:
            raise where.error(
                field_name, str(err), hint="use a nuScenes camera name, e.g. CAM_FRONT"
            ) from None
        if canonical in images:
            raise where.error(field_name, f"camera {canonical} is listed twice", hint="keep one per camera")
        if not isinstance(path, str) or not path:
            raise where.error(field_name, f"image path must be a non-empty string, got {path!r}")
        images[canonical] = ImageRef(camera=canonical, path=stored(path))
    return sorted(images.values(), key=lambda image: CAMERAS.index(image.camera))


def check_on_disk(
    where: Where, name: str, images: list[ImageRef], root: Path, *, allow_outside_root: bool = False
) -> None:
    """Raise :class:`MissingImages` when an image of field ``name`` is not a file under ``root``, and a
    :class:`DataError` when its path leads outside ``root`` (unless ``allow_outside_root``)."""
    resolved = []
    for image in images:
        try:
            resolved.append((image, image.resolve(root, allow_outside_root=allow_outside_root)))
        except ImageFileError as err:
            raise where.error(f"{name}.{image.camera}", str(err), OUTSIDE_ROOT_HINT) from None
    missing = [(image, path) for image, path in resolved if not path.is_file()]
    if not missing:
        return
    image, path = missing[0]
    raise MissingImages(
        where.file,
        where.row,
        f"{name}.{image.camera}",
        f"image not found: {path}",
        f"pass as --image-root the folder that holds {image_layout(image.path)}, or --text-only",
        paths=tuple(str(p) for _, p in missing),
        stored=image.path,
    )


def read_object_infos(where: Where, name: str, raw: Any) -> dict[str, dict[str, Any]]:
    """A ``key_object_infos`` object (of a DriveLM frame, or of a frame in DriveBench's visual_description.json).

    Each key must be one pixel tag and each value an object; keys are kept as written, in file order.
    """
    infos: dict[str, dict[str, Any]] = {}
    for key, info in expect(where, name, raw, dict).items():
        field_name = f"{name}.{key}"
        if len(read_tags(where, field_name, key, NUSCENES_SIZE)) != 1:
            raise where.error(field_name, "the key must be exactly one object tag", TAG_HINT)
        infos[key] = expect(where, field_name, info, dict)
    return infos


def tag_prefix(obj: ObjectTag) -> str:
    """``<cK,CAM`` of a tag: what object infos are matched by (their coordinates are pixels, ours normalised)."""
    return f"<{obj.id},{obj.camera}"


def match_object_info(obj: ObjectTag, infos: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The info of ``obj``: the first entry whose key starts with :func:`tag_prefix` of the tag, as upstream
    matches.

    Coordinates are ignored, so this works on pixel keys (a DriveLM frame, ``visual_description.json``) and on
    the normalised keys of ``meta["object_infos"]`` alike. Like upstream's ``startswith``, the prefix
    ``<c1,CAM_FRONT`` also matches a ``<c1,CAM_FRONT_LEFT,...>`` key listed before it.
    """
    prefix = tag_prefix(obj)
    return next((info for key, info in infos.items() if key.startswith(prefix)), None)


def question_object(question: str) -> ObjectTag | None:
    """The object DriveBench's judge is told about: the first tag of the question (upstream takes the first
    ``<...>`` span), or ``None`` when the question names none. A malformed tag raises ``ValueError``."""
    tags = parse_tags(question)
    return tags[0] if tags else None


def attach_object_infos(sample: Sample, infos: Mapping[str, dict[str, Any]]) -> None:
    """Store the infos of the objects ``sample`` references in ``meta["object_infos"]``, keyed by their tags."""
    referenced = {
        str(obj): info for obj in sample.objects if (info := match_object_info(obj, infos)) is not None
    }
    if referenced:
        sample.meta["object_infos"] = referenced


def require_predictions(samples: list[Sample], predictions: Mapping[str, str]) -> None:
    """An exporter of predictions needs one for every sample (the official evaluators look each question up)."""
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise DataError(
            "<predictions>",
            missing[0],
            None,
            f"{len(missing)} of {len(samples)} samples have no prediction (the first is shown as the row)",
            hint="generate answers for every sample first (drivekd eval generate)",
        )


def format_options(options: dict[str, str]) -> str:
    """The DriveLM/DriveBench option list that :func:`parse_options` reads back."""
    return " ".join([OPTIONS_PROMPT, *(f"{letter}. {text}" for letter, text in options.items())])


def parse_options(question: str) -> dict[str, str] | None:
    """Letter -> text of the options a multiple-choice question lists after "...from the following options:".

    ``None`` when the question lists no options; ``ValueError`` when it announces options but lists fewer than
    two. Letters must come in order (A, B, ...), so a stray "B. " inside an option's text does not split it.
    """
    marker = _OPTIONS_RE.search(question)
    if marker is None:
        return None
    tail = question[marker.end() :]
    starts: list[re.Match[str]] = []
    for match in _OPTION_START_RE.finditer(tail):
        if len(starts) < len(OPTION_LETTERS) and match.group(1) == OPTION_LETTERS[len(starts)]:
            starts.append(match)
    ends = [m.start() for m in starts[1:]] + [len(tail)]
    options = {m.group(1): tail[m.end() : end].strip() for m, end in zip(starts, ends, strict=True)}
    if len(options) < 2 or not all(options.values()):
        raise ValueError("the question announces options but does not list at least two as 'A. ... B. ...'")
    return options


def infer_kind(answer: str, options: dict[str, str] | None) -> Kind:
    """The kind of a QA item: mcq when the question lists options (answered by letter), yes/no, or open."""
    if options is not None:
        if answer not in options:
            raise ValueError(f"the answer {answer!r} is not one of the option letters {', '.join(options)}")
        return "mcq"
    return "yes/no" if _YES_NO_RE.fullmatch(answer.strip()) else "open"


def read_tags(where: Where, name: str, text: str, pixel_size: tuple[int, int] | None) -> list[ObjectTag]:
    """The object tags in field ``name`` (see :func:`parse_tags`); a bad one is a :class:`DataError` there."""
    try:
        return parse_tags(text, pixel_size=pixel_size)
    except ValidationError as err:
        raise where.error(name, err.errors()[0]["msg"].removeprefix("Value error, "), TAG_HINT) from None
    except ValueError as err:
        raise where.error(name, str(err), TAG_HINT) from None


def make_sample(
    where: Where,
    *,
    fields: tuple[str, str],
    question: str,
    answer: str,
    pixel_size: tuple[int, int] | None,
    sample_id: str,
    task: Task,
    images: list[ImageRef],
    scene_id: str,
    frame_id: str,
    meta: dict[str, Any],
    rationale: str | None = None,
    text_only: bool = False,
) -> Sample:
    """A :class:`Sample` from one upstream QA item: tags checked and collected as ``objects``, kind inferred.

    ``fields`` names the upstream question and answer fields (for errors; a rationale comes from the answer's
    field). With ``pixel_size`` the tags are pixel centres and are stored normalised in the text; otherwise they
    are taken as already normalised.
    """
    texts: list[str] = []
    objects: dict[str, ObjectTag] = {}
    for name, text in zip((*fields, fields[1]), (question, answer, rationale or ""), strict=True):
        if not text.strip():
            if len(texts) < 2:
                raise where.error(name, "empty text")
            break
        for tag in read_tags(where, name, text, pixel_size):
            objects.setdefault(str(tag), tag)
        texts.append(normalise_tags_in_text(text, pixel_size) if pixel_size else text)
    question, answer = texts[:2]
    rationale = texts[2] if len(texts) > 2 else None
    try:
        options = parse_options(question)
    except ValueError as err:
        raise where.error(
            fields[0], str(err), hint="list options as 'A. ... B. ...' after the prompt"
        ) from None
    try:
        kind = infer_kind(answer, options)
    except ValueError as err:
        raise where.error(fields[1], str(err), hint="answer a multiple-choice question by letter") from None
    return Sample(
        id=sample_id,
        images=images,
        question=question,
        answer=answer,
        rationale=rationale,
        capability=TASK_TO_CAPABILITY[task],
        task=task,
        kind=kind,
        options=options,
        objects=list(objects.values()),
        scene_id=scene_id,
        frame_id=frame_id,
        text_only=text_only,
        meta=meta,
    )
