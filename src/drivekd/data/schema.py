"""The Drive-KD sample: one driving VQA item, stored one per line in JSONL.

Every importer and the synthetic generator produce :class:`Sample`; every model-side component consumes it.
Image paths are stored as written and resolved against a root: by default the one the file's header records, else
the JSONL file's folder (:func:`drivekd.data.header.image_root_for`).

A ``text_only`` sample keeps its image references (so an exporter writes them back) but no reader checks or opens
them, and the collator builds a prompt without images (DriveBench's text-only setting).

``meta`` keys the importers write (read by scoring and the judge):

- ``drivebench_tag``: the DriveBench row's ``tag``, a list of ints as released (``[0]``); a bare int in older
  JSONL is read as a one-element list by :func:`drivekd.data.drivebench.scored_tag`, which gives the tag the
  official scorer routes by; :func:`drivekd.data.drivebench.judged` is false for the rows it leaves out
  (prediction tag 0, the yes/no questions, imported and counted but not judged).
- ``drivelm_tag``: the DriveLM QA item's ``tag`` list.
- ``pred``: a DriveBench prediction file's answer text (its ``pred`` field).
- ``object_infos``: ground-truth infos of the referenced objects, ``{normalised tag as the sample prints it:
  {Category, Status, Visual_description, 2d_bbox}}``, from a DriveLM frame's ``key_object_infos`` or DriveBench's
  ``visual_description.json``, matched by the ``<cK,CAM`` prefix of the tag as upstream matches
  (:func:`drivekd.data.qa.attach_object_infos`).
- ``gt``: structured ground truth of synthetic scenes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from drivekd.data.cameras import CAMERAS, check_camera
from drivekd.data.header import HEADER_KEY, header_line, image_root_for, is_header
from drivekd.data.images import OUTSIDE_ROOT_HINT, ImageFileError, confine
from drivekd.data.tags import ObjectTag, parse_tags
from drivekd.errors import DataError
from drivekd.fileio import write_atomically

Capability = Literal["perception", "reasoning", "planning"]
Task = Literal["perception", "prediction", "planning", "behavior"]
Kind = Literal["mcq", "open", "yes/no"]
# Where the short answer sits in the supervised text (Sample.target_text, data.answer_order).
AnswerOrder = Literal["answer_first", "rationale_first", "rationale_option_first"]
ANSWER_ORDERS: tuple[AnswerOrder, ...] = get_args(AnswerOrder)

CAPABILITIES: tuple[Capability, ...] = ("perception", "reasoning", "planning")
# The paper reports DriveBench prediction and behavior together as reasoning.
TASK_TO_CAPABILITY: dict[str, Capability] = {
    "perception": "perception",
    "prediction": "reasoning",
    "behavior": "reasoning",
    "planning": "planning",
}
OPTION_LETTERS = ("A", "B", "C", "D")


class ImageRef(BaseModel):
    """One camera image of a sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    camera: str
    path: str

    @field_validator("camera")
    @classmethod
    def _known_camera(cls, value: str) -> str:
        return check_camera(value)

    def resolve(self, root: Path, *, allow_outside_root: bool = False) -> Path:
        """The image's path under ``root``; one that resolves outside it (``..``, absolute, a symlink out) raises
        :class:`~drivekd.data.images.ImageFileError` unless ``allow_outside_root``."""
        return confine(root, self.path, allow_outside_root=allow_outside_root)


class Sample(BaseModel):
    """A driving VQA sample (see docs/architecture.md for the field meanings)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    images: list[ImageRef] = Field(min_length=1)
    question: str = Field(min_length=1)
    capability: Capability
    task: Task
    kind: Kind
    options: dict[str, str] | None = None
    answer: str = Field(min_length=1)
    rationale: str | None = None
    objects: list[ObjectTag] = Field(default_factory=list)
    scene_id: str = ""
    frame_id: str = ""
    # Images are listed (and exported) but never checked or opened: the question is asked without them.
    text_only: bool = False
    # Free-form extras: structured ground truth of synthetic scenes, upstream tags, object descriptions for a judge.
    meta: dict[str, Any] = Field(default_factory=dict)

    # Field validators run in declaration order, so each check below sees the fields it depends on.
    @field_validator("question", "answer", "rationale")
    @classmethod
    def _well_formed_tags(cls, text: str | None) -> str | None:
        if text:
            try:
                parse_tags(text)
            except (
                ValueError
            ) as err:  # a pydantic ValidationError of a tag's camera or coordinates is one too
                first = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
                raise ValueError(
                    f"{first.removeprefix('Value error, ')} (write tags as <cK,CAM_NAME,x,y>)"
                ) from None
        return text

    @field_validator("images")
    @classmethod
    def _distinct_cameras(cls, images: list[ImageRef]) -> list[ImageRef]:
        cameras = [im.camera for im in images]
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"duplicate camera in images: {cameras}")
        return images

    @field_validator("task")
    @classmethod
    def _task_matches_capability(cls, task: str, info: ValidationInfo) -> str:
        capability = info.data.get("capability")
        if capability is not None and TASK_TO_CAPABILITY[task] != capability:
            raise ValueError(
                f"task {task!r} belongs to capability {TASK_TO_CAPABILITY[task]!r}, not {capability!r}"
            )
        return task

    @field_validator("options")
    @classmethod
    def _options_fit_kind(cls, options: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        if info.data.get("kind") != "mcq":
            return options
        if not options or len(options) < 2:
            raise ValueError("an mcq sample needs at least two options")
        if set(options) - set(OPTION_LETTERS):
            raise ValueError(f"mcq option keys must be among {OPTION_LETTERS}, got {sorted(options)}")
        return options

    @field_validator("answer")
    @classmethod
    def _mcq_answer_is_an_option(cls, answer: str, info: ValidationInfo) -> str:
        options = info.data.get("options")
        if info.data.get("kind") == "mcq" and options and answer not in options:
            raise ValueError(f"mcq answer {answer!r} is not one of the options {sorted(options)}")
        return answer

    @property
    def multi_view(self) -> bool:
        return len(self.images) > 1

    @property
    def full_answer(self) -> str:
        """The supervised answer text: the short answer, then the rationale when there is one."""
        return self.target_text("answer_first")

    def target_text(self, order: AnswerOrder) -> str:
        """The supervised answer text in ``order``: ``answer_first`` is the short answer, then the rationale (the
        DriveBench layout); ``rationale_first`` puts the rationale of an MCQ or yes/no question first, then a
        ``Final: <answer>`` line, so a model states what it sees before it commits to a choice (the strict readers
        take the ``Final:`` marker). ``rationale_option_first`` is ``rationale_first`` with the chosen option's text
        on a ``Chosen:`` line before an MCQ's ``Final:`` line, so the letter follows the very text it labels in the
        question (a small model learns that look-up far sooner than one from the rationale's wording). Open
        answers keep the answer first: there is no choice to defer."""
        if not self.rationale:
            return self.answer
        if order == "rationale_option_first" and self.kind == "mcq" and self.options:
            return f"{self.rationale}\nChosen: {self.options[self.answer]}\nFinal: {self.answer}"
        if order != "answer_first" and self.kind != "open":
            return f"{self.rationale}\nFinal: {self.answer}"
        return f"{self.answer}\n{self.rationale}"

    @property
    def shown_images(self) -> list[ImageRef]:
        """The images a model sees, in nuScenes camera order: none for a text-only sample."""
        if self.text_only:
            return []
        return sorted(self.images, key=lambda im: CAMERAS.index(im.camera))


def _field_of(error: ValidationError) -> str:
    first = error.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or "<row>"


def _message_of(error: ValidationError) -> str:
    first = error.errors()[0]
    return first["msg"].removeprefix("Value error, ")


def validate_row(row: Any, *, file: str, index: int) -> Sample:
    """Build a :class:`Sample` from a dict, turning validation failures into a :class:`DataError`."""
    if not isinstance(row, dict):
        raise DataError(file, index, None, f"expected a JSON object, got {type(row).__name__}")
    try:
        return Sample.model_validate(row)
    except ValidationError as err:
        raise DataError(file, index, _field_of(err), _message_of(err)) from None


def check_images(
    sample: Sample, root: Path, *, file: str, index: int, allow_outside_root: bool = False
) -> None:
    """Raise a :class:`DataError` naming the first image of ``sample`` that is outside ``root`` or not on disk
    (none for text-only)."""
    if sample.text_only:
        return
    for k, image in enumerate(sample.images):
        try:
            path = image.resolve(root, allow_outside_root=allow_outside_root)
        except ImageFileError as err:
            raise DataError(file, index, f"images.{k}.path", str(err), hint=OUTSIDE_ROOT_HINT) from None
        if not path.is_file():
            raise DataError(
                file,
                index,
                f"images.{k}.path",
                f"image not found: {path}",
                hint="check the image root (--image-root) or pass --skip-invalid",
            )


def read_jsonl(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    check_files: bool = True,
    skip_invalid: bool = False,
    errors: list[DataError] | None = None,
    allow_outside_root: bool = False,
) -> Iterator[Sample]:
    """Stream samples from a JSONL file, validating each row.

    ``image_root`` defaults to the root the file's header records, else the file's folder
    (:func:`~drivekd.data.header.image_root_for`); image paths must stay inside it unless ``allow_outside_root``.
    The header line is not a sample, and a header on any other line is an error of that line.
    With ``skip_invalid`` bad rows are appended to ``errors`` (when given) and skipped instead of raising.
    Text-only samples' images are never checked. A line that is not UTF-8 and an id seen on an earlier line are
    errors of that line. A file that cannot be opened is a :class:`DataError` naming it.
    """
    path = Path(path)
    root = image_root_for(path, image_root, check=check_files)
    seen: dict[str, int] = {}
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(
            str(path),
            None,
            None,
            f"cannot read the file: {err.strerror or err}",
            hint="pass an existing JSONL file",
        ) from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        str(path), lineno, None, f"not UTF-8 text: {err.reason} at byte {err.start}"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(str(path), lineno, None, f"not valid JSON: {err.msg}") from None
                if is_header(row):
                    if lineno == 1:
                        continue
                    raise DataError(
                        str(path),
                        lineno,
                        HEADER_KEY,
                        "a header belongs on the first line only",
                        hint="remove it",
                    )
                sample = validate_row(row, file=str(path), index=lineno)
                if check_files:
                    check_images(
                        sample, root, file=str(path), index=lineno, allow_outside_root=allow_outside_root
                    )
                if sample.id in seen:
                    raise DataError(
                        str(path),
                        lineno,
                        "id",
                        f"duplicate id {sample.id!r} (first on row {seen[sample.id]})",
                        hint="give every sample its own id",
                    )
                seen[sample.id] = lineno
            except DataError as err:
                if not skip_invalid:
                    raise
                if errors is not None:
                    errors.append(err)
                continue
            yield sample


def write_jsonl(samples: Iterable[Sample], path: str | Path, *, image_root: str | Path | None = None) -> int:
    """Write samples to ``path`` atomically (a temporary file renamed into place); returns the count.

    With ``image_root`` (the folder the samples' image paths are relative to) a header recording it comes first,
    so readers find the images without being told (:mod:`drivekd.data.header`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tmp.open("w", encoding="utf-8") as handle:
            if image_root is not None:
                handle.write(header_line(Path(image_root), path))
            for sample in samples:
                # ``text_only`` is written only when set, so files of image samples stay as they were.
                exclude = None if sample.text_only else {"text_only"}
                handle.write(sample.model_dump_json(exclude_none=True, exclude=exclude) + "\n")
                count += 1

    write_atomically(path, write)
    return count
