"""Teacher/student pairs: build tiny ones offline, save and reload them, and check their token layouts agree.

Attention maps of teacher and student are compared entry by entry, so both must turn a sample into the same token
sequence (same vision-token count and positions). A pair that does not is refused before any training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.collate import VLMCollator
from drivekd.data.schema import Sample
from drivekd.errors import LayoutMismatchError, ModelSourceError
from drivekd.models.families import (
    TINY_STUDENT,
    TINY_TEACHER,
    FamilyAdapter,
    TinySize,
    family_of,
    get_family,
    load_pretrained,
)
from drivekd.models.lora import adapter_base, is_adapter, merge_adapter

TINY_PREFIX = "tiny:"
TINY_IMAGE_SIZE = (112, 63)
ROLES = ("teacher", "student")


@dataclass
class ModelPair:
    """A teacher and a student of one family with their processors."""

    family: FamilyAdapter
    teacher: PreTrainedModel
    student: PreTrainedModel
    teacher_processor: ProcessorMixin
    student_processor: ProcessorMixin

    def collators(self, image_root: Path | str, **kwargs: Any) -> tuple[VLMCollator, VLMCollator]:
        """Collators for teacher and student (same options)."""
        return (
            VLMCollator(
                self.teacher_processor,
                self.family.image_token_id(self.teacher),
                image_root=image_root,
                **kwargs,
            ),
            VLMCollator(
                self.student_processor,
                self.family.image_token_id(self.student),
                image_root=image_root,
                **kwargs,
            ),
        )

    def check_layout(self, samples: Sequence[Sample], image_root: Path | str) -> None:
        """Raise :class:`LayoutMismatchError` unless both sides tokenise ``samples`` identically."""
        teacher_collate, student_collate = self.collators(image_root)
        for sample in samples:
            t, s = teacher_collate([sample]), student_collate([sample])
            t_ids, s_ids = t.inputs["input_ids"][0], s.inputs["input_ids"][0]
            same = t_ids.shape == s_ids.shape and torch.equal(t.roles.vision, s.roles.vision)
            same = (
                same
                and torch.equal(t.roles.text, s.roles.text)
                and torch.equal(t.roles.answer, s.roles.answer)
            )
            if not same:
                raise LayoutMismatchError(
                    f"teacher and student tokenise sample {sample.id!r} differently (teacher: {len(t_ids)} tokens, "
                    f"{int(t.roles.vision.sum())} vision; student: {len(s_ids)} tokens, {int(s.roles.vision.sum())} "
                    "vision). Attention maps can only be distilled between models with the same token layout: use "
                    "the same processor settings (image size, tiling, chat template) for both."
                )

    def save(self, folder: Path | str) -> Path:
        """Write ``teacher/`` and ``student/`` in Hugging Face format (each loadable by transformers)."""
        folder = Path(folder)
        for role, model, processor in (
            ("teacher", self.teacher, self.teacher_processor),
            ("student", self.student, self.student_processor),
        ):
            model.save_pretrained(folder / role)
            processor.save_pretrained(folder / role)
        return folder


def build_tiny_pair(
    family: str,
    *,
    teacher: TinySize = TINY_TEACHER,
    student: TinySize = TINY_STUDENT,
    image_size: tuple[int, int] = TINY_IMAGE_SIZE,
    seed: int = 0,
) -> ModelPair:
    """A randomly initialised teacher/student pair sharing one offline tokenizer and processor.

    A pair of the default shapes names its models by :func:`tiny_spec` (their ``name_or_path``), so a LoRA
    adapter trained on one records a base that :func:`load_spec` rebuilds."""
    adapter = get_family(family)
    tokenizer = adapter.tiny_tokenizer()
    processor = adapter.tiny_processor(tokenizer, image_size)
    pair = ModelPair(
        adapter,
        adapter.tiny_model(teacher, tokenizer, image_size, seed=seed),
        adapter.tiny_model(student, tokenizer, image_size, seed=seed + 1),
        processor,
        processor,
    )
    if (teacher, student, tuple(image_size)) == (TINY_TEACHER, TINY_STUDENT, TINY_IMAGE_SIZE):
        pair.teacher.name_or_path = tiny_spec(family, "teacher", seed)
        pair.student.name_or_path = tiny_spec(family, "student", seed)
    return pair


def tiny_spec(family: str, role: str, seed: int) -> str:
    """The full name of one model of a default tiny pair: ``tiny:<family>:<role>:<pair seed>``."""
    return f"{TINY_PREFIX}{family}:{role}:{seed}"


def _parse_tiny(spec: str, role: str, seed: int) -> tuple[str, str, int]:
    """Family, role and pair seed of ``tiny:<family>`` (role and seed as given) or a full :func:`tiny_spec`."""
    family, *rest = spec.removeprefix(TINY_PREFIX).split(":")
    if not rest:
        return family, role, seed
    if len(rest) != 2 or rest[0] not in ROLES or not rest[1].isdigit():
        raise ModelSourceError(
            f"tiny model {spec!r} must be tiny:<family> or tiny:<family>:<teacher|student>:<seed>"
        )
    return family, rest[0], int(rest[1])


def load_pair(family: str, teacher: str | Path, student: str | Path, **kwargs: Any) -> ModelPair:
    """Load a pair from hub ids or folders (``kwargs`` go to ``from_pretrained``, e.g. ``dtype``)."""
    adapter = get_family(family)
    teacher_model, teacher_processor = adapter.load(teacher, **kwargs)
    student_model, student_processor = adapter.load(student, **kwargs)
    return ModelPair(adapter, teacher_model, student_model, teacher_processor, student_processor)


def load_spec(
    spec: str | Path,
    *,
    role: str = "student",
    family: str | None = None,
    dtype: torch.dtype | str = "auto",
    seed: int = 0,
    **kwargs: Any,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load any model a command is given; every command that loads a model goes through here.

    ``tiny:<family>`` builds that ``role`` of an offline tiny pair (random weights; a full :func:`tiny_spec` names
    role and seed itself); a LoRA adapter folder (a LoRA student's checkpoint) loads the base model its adapter
    config records, with the adapter merged in, and the processor saved beside the adapter; anything else is a hub
    id or folder loaded with ``from_pretrained`` (family read from its config unless given; ``kwargs`` such as
    ``device_map`` go to it)."""
    spec = str(spec)
    if spec.startswith(TINY_PREFIX):
        name, role, seed = _parse_tiny(spec, role, seed)
        pair = build_tiny_pair(name, seed=seed)
        teacher = role == "teacher"
        model = pair.teacher if teacher else pair.student
        processor = pair.teacher_processor if teacher else pair.student_processor
        return (model if dtype == "auto" else model.to(dtype)), processor
    if is_adapter(spec):
        base, processor = load_spec(
            adapter_base(spec), role=role, family=family, dtype=dtype, seed=seed, **kwargs
        )
        if (Path(spec).expanduser() / "processor_config.json").is_file():
            processor = family_of(base).load_processor(Path(spec).expanduser())
        return merge_adapter(base, spec), processor
    if family:
        return get_family(family).load(spec, dtype=dtype, **kwargs)
    return load_pretrained(spec, dtype=dtype, **kwargs)
