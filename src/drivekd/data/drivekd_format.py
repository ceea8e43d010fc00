"""Import and export the data format of the Drive-KD release (the paper's training code, ``data/demo.json``).

A file is a JSON list (or an object holding it under ``data``, ``items``, ``samples``, ``dataset`` or ``records``)
of items::

    {"messages": [{"role": "user", "content": "<image>...question"}, {"role": "assistant", "content": "..."}],
     "images": ["path/one.jpg", ...], "question_type": "perception" | "reasoning" | "planning"}

- ``question_type`` (or ``type``, ``capability``) names the capability, with the release's aliases (:data:`ALIASES`,
  then any name containing ``percep``, ``reason`` or ``plan``); ``prediction`` and ``behavior`` name a task directly.
  A reasoning item is task behavior when it is an ego-behaviour multiple-choice question, else prediction.
- The user turn holds one ``<image>`` placeholder per image (or none); they are dropped from the question, since
  Drive-KD names each image by its camera. The camera of an image is taken from its path (a ``CAM_*`` folder,
  file stem or ``__CAM_*__`` token, as nuScenes names them); a lone image without one is the front view (BDD100K
  and other single-view sets). Paths are kept verbatim and resolved against the image root.
- The assistant turn's ``Final: ...`` line (braces around the answer optional) is the short answer, the other lines
  the rationale; without such a line the whole turn is the answer. An MCQ's final answer may repeat the option
  text (``A. Going ahead.``); it is stored as the letter and must agree with the option.
- Object tags are normalised ``<cK,CAM,x,y>`` as in DriveBench; a tag the schema refuses is an error, never altered.

Export writes the same layout (``question_type`` as the capability, an MCQ answer as ``Final: A. <option>``) and an
``id`` key, which the release's loader ignores and which makes import -> export -> import the identity (a
reasoning sample's task is derived again on import, so a prediction MCQ about the ego vehicle's behaviour would come
back as behavior).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from drivekd.data.cameras import CAMERAS
from drivekd.data.qa import (
    ImportResult,
    Where,
    check_on_disk,
    collect,
    expect,
    image_root_of,
    load_json,
    make_sample,
    parse_options,
    require,
)
from drivekd.data.schema import CAPABILITIES, ImageRef, Sample, Task
from drivekd.errors import DataError

# The release's question_type aliases (train.py), after lower-casing and turning "-" and " " into "_".
ALIASES: dict[str, str] = {
    **dict.fromkeys(("perception", "perceptual", "perceive", "per", "p"), "perception"),
    **dict.fromkeys(("reasoning", "reason", "logical_reasoning", "infer", "r"), "reasoning"),
    **dict.fromkeys(("planning", "plan", "pl", "d", "decision"), "planning"),
}
_TASKS: dict[str, Task] = {"prediction": "prediction", "behavior": "behavior", "behaviour": "behavior"}
_WRAPPERS = ("data", "items", "samples", "dataset", "records")
_FINAL_RE = re.compile(r"^[ \t]*Final[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE | re.IGNORECASE)
_LETTER_RE = re.compile(r"\(?([A-D])\)?(?:[.:)]\s*(.*))?", re.DOTALL)
_EGO_BEHAVIOUR_RE = re.compile(r"behaviou?r of the ego vehicle", re.IGNORECASE)
IMAGE = "<image>"


def import_drivekd(
    path: str | Path,
    image_root: str | Path | None,
    *,
    skip_invalid: bool = False,
    text_only: bool = False,
    allow_outside_root: bool = False,
) -> ImportResult:
    """Read a file in the Drive-KD release format (see the module docstring).

    ``image_root`` is the folder the ``images`` paths are relative to (and must stay inside, unless
    ``allow_outside_root``); with ``text_only`` images are neither
    needed nor checked and the samples say so. An unusable item raises a :class:`DataError` whose row is its list
    index; with ``skip_invalid`` it is skipped and its error listed instead. Ids are the items' ``id`` keys when
    present, else ``{file stem}_{index}``.
    """
    path = Path(path)
    items = _items(str(path), load_json(path))
    root = image_root_of(str(path), image_root, text_only)
    return collect(_samples(str(path), path.stem, items, root, allow_outside_root), skip_invalid=skip_invalid)


def _items(file: str, data: Any) -> list[Any]:
    if isinstance(data, dict):
        data = next((data[key] for key in _WRAPPERS if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise DataError(
            file,
            None,
            None,
            f"expected a JSON list of items (or an object with one under {', '.join(_WRAPPERS)})",
            hint="pass a file in the Drive-KD release format, such as its data/demo.json",
        )
    return data


def _samples(
    file: str, stem: str, items: list[Any], root: Path | None, outside: bool
) -> Iterator[Sample | DataError]:
    for index, item in enumerate(items):
        where = Where(file, index)
        try:
            yield _sample(where, item, stem, root, outside)
        except DataError as err:
            yield err


def _sample(where: Where, item: Any, stem: str, root: Path | None, outside: bool) -> Sample:
    if not isinstance(item, dict):
        raise where.error("<row>", f"expected a JSON object, got {type(item).__name__}")
    type_field = next(
        (key for key in ("question_type", "type", "capability") if key in item), "question_type"
    )
    capability_or_task = question_type(where, type_field, require(where, item, type_field, str))
    (user_field, user), (answer_field, reply) = _turns(where, require(where, item, "messages", list))
    images = _images(where, require(where, item, "images", list))
    placeholders = user.count(IMAGE)
    if placeholders not in (0, len(images)):
        raise where.error(
            user_field,
            f"{placeholders} {IMAGE} placeholders for {len(images)} images",
            hint=f"write one {IMAGE} per entry of 'images'",
        )
    if root is not None:
        check_on_disk(where, "images", images, root, allow_outside_root=outside)
    question = user.replace(IMAGE, "").strip()
    answer, rationale = split_final(reply)
    options = _options(question)
    if options is not None:
        answer = _mcq_letter(where, answer_field, answer, options)
    task = _task(capability_or_task, question, options)
    sample_id = item.get("id") if isinstance(item.get("id"), str) and item["id"] else f"{stem}_{where.row}"
    return make_sample(
        where,
        fields=(user_field, answer_field),
        question=question,
        answer=answer,
        pixel_size=None,
        sample_id=sample_id,
        task=task,
        images=images,
        scene_id="",
        frame_id="",
        meta={},
        rationale=rationale,
        text_only=root is None,
    )


def question_type(where: Where, name: str, raw: str) -> str:
    """The capability (or task) a ``question_type`` value names, with the release's aliases."""
    key = raw.strip().lower().replace("-", "_").replace(" ", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in _TASKS:
        return _TASKS[key]
    for capability, part in zip(CAPABILITIES, ("percep", "reason", "plan"), strict=True):
        if part in key:
            return capability
    raise where.error(
        name,
        f"unknown question_type {raw!r}",
        hint="use perception, reasoning or planning (or prediction, behavior)",
    )


def _turns(where: Where, messages: list[Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(field, text) of the first user turn and of the first assistant turn."""
    found: dict[str, tuple[str, str]] = {}
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role.strip().lower() in ("user", "assistant"):
            name = f"messages.{k}.content"
            found.setdefault(role.strip().lower(), (name, expect(where, name, message.get("content"), str)))
    for role in ("user", "assistant"):
        if role not in found:
            raise where.error("messages", f"no {role} turn", hint="give a user and an assistant message")
    return found["user"], found["assistant"]


def camera_of(path: str) -> str | None:
    """The nuScenes camera a path names (a folder, file stem or ``__CAM_*__`` token), or ``None``."""
    for part in PurePosixPath(path).parts:
        for token in part.split("__"):
            stem = token.split(".")[0]
            if stem in CAMERAS:
                return stem
    return None


def _images(where: Where, paths: list[Any]) -> list[ImageRef]:
    if not paths:
        raise where.error("images", "no images", hint="list at least one image path")
    images: dict[str, ImageRef] = {}
    for k, path in enumerate(paths):
        name = f"images.{k}"
        if not isinstance(path, str) or not path:
            raise where.error(name, f"image path must be a non-empty string, got {path!r}")
        camera = camera_of(path)
        if camera is None and len(paths) == 1:
            camera = "CAM_FRONT"
        if camera is None:
            raise where.error(
                name,
                f"cannot tell the camera of {path!r}",
                hint="name multi-view images by their nuScenes camera (a samples/CAM_FRONT/... folder)",
            )
        if camera in images:
            raise where.error(name, f"camera {camera} is listed twice", hint="keep one image per camera")
        images[camera] = ImageRef(camera=camera, path=path)
    return sorted(images.values(), key=lambda image: CAMERAS.index(image.camera))


def split_final(reply: str) -> tuple[str, str | None]:
    """The short answer and the rationale of an assistant turn (see the module docstring)."""
    final = _FINAL_RE.search(reply)
    if final is None:
        return reply.strip(), None
    answer = final.group(1).strip()
    if answer.startswith("{") and answer.endswith("}"):
        answer = answer[1:-1].strip()
    rest = (reply[: final.start()] + reply[final.end() :]).strip()
    return answer, rest or None


def _options(question: str) -> dict[str, str] | None:
    try:
        return parse_options(question)
    except ValueError:
        return None  # make_sample reports it on the question's field


def _squash(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def _mcq_letter(where: Where, name: str, answer: str, options: dict[str, str]) -> str:
    """The option letter of an MCQ's final answer (``A``, ``A.``, ``(A)``, ``A. Going ahead.``)."""
    match = _LETTER_RE.fullmatch(answer.strip())
    if match is None or match.group(1) not in options:
        return answer  # not a letter: make_sample reports it
    letter, text = match.group(1), match.group(2)
    if text and _squash(text) != _squash(options[letter]):
        raise where.error(
            name,
            f"the final answer {answer!r} names option {letter}, whose text is {options[letter]!r}",
            hint="make the Final line's letter and option text agree",
        )
    return letter


def _task(capability_or_task: str, question: str, options: dict[str, str] | None) -> Task:
    if capability_or_task == "reasoning":
        return "behavior" if options is not None and _EGO_BEHAVIOUR_RE.search(question) else "prediction"
    return capability_or_task  # type: ignore[return-value]  # perception, planning, prediction or behavior


def to_drivekd(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """Items in the Drive-KD release format for ``samples`` (see the module docstring)."""
    items = []
    for sample in samples:
        answer = sample.answer
        if sample.kind == "mcq" and sample.options:
            answer = f"{answer}. {sample.options[answer]}"
        if sample.rationale and "\n" in answer:
            raise DataError(
                "<samples>",
                sample.id,
                "answer",
                "an answer of several lines cannot be a Final line followed by the rationale",
                hint="write the short answer on one line",
            )
        reply = f"Final: {answer}\n{sample.rationale}" if sample.rationale else answer
        items.append(
            {
                "messages": [
                    {"role": "user", "content": IMAGE * len(sample.images) + sample.question},
                    {"role": "assistant", "content": reply},
                ],
                "images": [image.path for image in sample.images],
                "question_type": sample.capability,
                "id": sample.id,
            }
        )
    return items
