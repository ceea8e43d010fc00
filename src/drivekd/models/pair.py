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
from drivekd.errors import LayoutMismatchError
from drivekd.models.families import (
    TINY_STUDENT,
    TINY_TEACHER,
    FamilyAdapter,
    TinySize,
    get_family,
    load_pretrained,
)

TINY_PREFIX = "tiny:"


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
    image_size: tuple[int, int] = (112, 63),
    seed: int = 0,
) -> ModelPair:
    """A randomly initialised teacher/student pair sharing one offline tokenizer and processor."""
    adapter = get_family(family)
    tokenizer = adapter.tiny_tokenizer()
    processor = adapter.tiny_processor(tokenizer, image_size)
    return ModelPair(
        adapter,
        adapter.tiny_model(teacher, tokenizer, image_size, seed=seed),
        adapter.tiny_model(student, tokenizer, image_size, seed=seed + 1),
        processor,
        processor,
    )


def load_pair(family: str, teacher: str | Path, student: str | Path, **kwargs: Any) -> ModelPair:
    """Load a pair from hub ids or folders (``kwargs`` go to ``from_pretrained``, e.g. ``dtype``)."""
    adapter = get_family(family)
    teacher_model, teacher_processor = adapter.load(teacher, **kwargs)
    student_model, student_processor = adapter.load(student, **kwargs)
    return ModelPair(adapter, teacher_model, student_model, teacher_processor, student_processor)


def load_spec(
    spec: str,
    *,
    role: str = "student",
    family: str | None = None,
    dtype: torch.dtype | str = "auto",
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A model named on the command line: ``tiny:<family>`` builds that ``role`` of an offline tiny pair (random
    weights); anything else is a hub id or folder loaded with ``from_pretrained`` (family read from its config
    unless given)."""
    if spec.startswith(TINY_PREFIX):
        pair = build_tiny_pair(spec.removeprefix(TINY_PREFIX), seed=seed)
        teacher = role == "teacher"
        model = pair.teacher if teacher else pair.student
        processor = pair.teacher_processor if teacher else pair.student_processor
        return (model if dtype == "auto" else model.to(dtype)), processor
    if family:
        return get_family(family).load(spec, dtype=dtype)
    return load_pretrained(spec, dtype=dtype)
