"""Turn samples into model batches through the family's real processor, with per-token role masks.

Each sample is rendered with the processor's chat template (system prompt, one image part per camera in nuScenes
order with its camera name, the question), processed with its images, and followed by the tokenised answer. Labels
are set only on the answer span (eq. 9). Padding is done here so both sides and per-sample processing are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import ProcessorMixin

from drivekd.data.images import ImageFileError, open_image
from drivekd.data.roles import TokenRoles
from drivekd.data.schema import AnswerOrder, ImageRef, Sample
from drivekd.errors import DataError

IGNORE_INDEX = -100
SYSTEM_PROMPT = (
    "You are a driving assistant on an autonomous vehicle. You see camera images of the ego vehicle's surroundings, "
    "each named by its camera. Objects are referred to as <cK,CAM,x,y>: object K seen by camera CAM with its centre "
    "at x, y, normalised to [0, 1] from the image's top-left corner. Answer briefly, then explain."
)
# Per-sample tensors concatenated along dim 0 (images of all samples in order).
_CONCAT_KEYS = ("pixel_values", "image_grid_thw", "num_patches")


@dataclass
class Batch:
    """A collated batch: model inputs, answer-span labels and token roles."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    roles: TokenRoles
    sample_ids: list[str]
    capabilities: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(
            inputs,
            self.labels.to(device),
            self.roles.to(device),
            self.sample_ids,
            self.capabilities,
            self.meta,
        )


def build_messages(sample: Sample, *, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Chat messages for a sample: cameras in nuScenes order, each named before its image, then the question.

    A text-only sample gets the question alone (no image parts).
    """
    content: list[dict[str, Any]] = []
    for image in sample.shown_images:
        content.append({"type": "text", "text": f"{image.camera}:\n"})
        content.append({"type": "image"})
    content.append({"type": "text", "text": sample.question})
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": content},
    ]


def special_token_ids(tokenizer: Any) -> set[int]:
    """Every id the tokenizer marks special (chat markers, image markers, padding)."""
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids | set(tokenizer.all_special_ids)


class VLMCollator:
    """Collate :class:`Sample` objects for one model family.

    ``padding_side`` is explicit because processors disagree on the default (InternVL pads left). With
    ``with_answer=False`` the batch ends at the generation prompt (for evaluation). Images are opened only inside
    ``image_root`` unless ``allow_outside_root``, and decoded with a pixel limit (:mod:`drivekd.data.images`).
    ``answer_order`` lays out the supervised text (:meth:`Sample.target_text`); teacher and student collators of a
    run must share it, since the teacher's signals are taken on the student's tokens.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        image_token_id: int,
        *,
        image_root: Path | str,
        padding_side: Literal["left", "right"] = "right",
        system_prompt: str = SYSTEM_PROMPT,
        with_answer: bool = True,
        allow_outside_root: bool = False,
        answer_order: AnswerOrder = "answer_first",
    ) -> None:
        self.processor = processor
        self.answer_order = answer_order
        self.allow_outside_root = allow_outside_root
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.image_root = Path(image_root)
        self.padding_side = padding_side
        self.system_prompt = system_prompt
        self.with_answer = with_answer
        self.special_ids = special_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        encoded = [self._encode(s) for s in samples]
        length = max(len(e["input_ids"]) for e in encoded)
        rows: dict[str, list[torch.Tensor]] = {
            "input_ids": [],
            "labels": [],
            "mm_token_type_ids": [],
            "valid": [],
        }
        for e in encoded:
            pad = length - len(e["input_ids"])
            for key, fill in (("input_ids", self.pad_id), ("labels", IGNORE_INDEX), ("mm_token_type_ids", 0)):
                rows[key].append(self._pad(e[key], pad, fill))
            rows["valid"].append(self._pad(torch.ones(len(e["input_ids"]), dtype=torch.bool), pad, False))
        input_ids = torch.stack(rows["input_ids"])
        labels = torch.stack(rows["labels"])
        valid = torch.stack(rows["valid"])
        inputs = {"input_ids": input_ids, "attention_mask": valid.long()}
        if any("mm_token_type_ids" in e["extra"] for e in encoded):
            inputs["mm_token_type_ids"] = torch.stack(rows["mm_token_type_ids"])
        for key in _CONCAT_KEYS:
            parts = [e["extra"][key] for e in encoded if key in e["extra"]]
            if parts:
                inputs[key] = torch.cat(parts)
        inputs.pop("num_patches", None)
        vision = (input_ids == self.image_token_id) & valid
        special = torch.isin(input_ids, torch.tensor(sorted(self.special_ids), dtype=input_ids.dtype))
        roles = TokenRoles(
            vision=vision, text=valid & ~vision & ~special, answer=labels != IGNORE_INDEX, padding=~valid
        )
        return Batch(inputs, labels, roles, [s.id for s in samples], [s.capability for s in samples])

    def token_length(self, sample: Sample) -> int:
        """The tokens of ``sample`` as this collator builds it (images and, with ``with_answer``, the answer)."""
        return len(self._encode(sample)["input_ids"])

    def _pad(self, row: torch.Tensor, pad: int, fill: int | bool) -> torch.Tensor:
        filler = torch.full((pad,), fill, dtype=row.dtype)
        return torch.cat([filler, row] if self.padding_side == "left" else [row, filler])

    def _encode(self, sample: Sample) -> dict[str, Any]:
        messages = build_messages(sample, system_prompt=self.system_prompt)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        shown = sample.shown_images
        images = [self._load_image(sample, k, im) for k, im in enumerate(shown)]
        out = self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        prompt_ids = out["input_ids"][0]
        extra = {k: v for k, v in out.items() if k in _CONCAT_KEYS}
        mm_types = out.get("mm_token_type_ids")
        if mm_types is not None:
            extra["mm_token_type_ids"] = True
        mm = mm_types[0] if mm_types is not None else torch.zeros_like(prompt_ids)
        answer_ids = self._answer_ids(messages, prompt, sample) if self.with_answer else prompt_ids[:0]
        input_ids = torch.cat([prompt_ids, answer_ids])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        return {
            "input_ids": input_ids,
            "labels": labels,
            "mm_token_type_ids": torch.cat([mm, torch.zeros_like(answer_ids)]),
            "extra": extra,
        }

    def _answer_ids(self, messages: list[dict[str, Any]], prompt: str, sample: Sample) -> torch.Tensor:
        """Token ids of the answer followed by the template's end-of-turn marker (so the model learns to stop)."""
        answer = sample.target_text(self.answer_order)
        turn = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = self.processor.apply_chat_template(turn, tokenize=False)
        if not full.startswith(prompt + answer):
            raise DataError(
                "<collate>",
                sample.id,
                "answer",
                "the chat template does not render the answer right after the generation prompt",
                hint="use a chat template whose assistant turn is the generation prompt followed by the text",
            )
        suffix = full[len(prompt) + len(answer) :].rstrip()
        ids = self.tokenizer(answer + suffix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        return ids

    def _load_image(self, sample: Sample, index: int, image: ImageRef) -> Image.Image:
        try:
            return open_image(image.resolve(self.image_root, allow_outside_root=self.allow_outside_root))
        except ImageFileError as err:
            raise DataError(
                str(self.image_root / image.path),
                sample.id,
                f"images.{index}.path",
                f"cannot read image: {err}",
                hint="check the image root or regenerate the data",
            ) from None
