"""`drivekd eval generate`: answer every sample with a model and append the answers to a predictions file.

Prompts follow the DriveBench convention already used for training: the Drive-KD system prompt, then one image per
camera in nuScenes order, each named by its camera, then the question with normalised object tags (see
:func:`drivekd.data.collate.build_messages`). Batches are left-padded and decoded greedily with Hugging Face
``generate``; an optional vLLM back end serves the same prompts on a GPU. Records are written as they come, so a
rerun continues where a crash stopped (:class:`~drivekd.evaluation.predictions.PredictionWriter`). A sample whose
prompt plus the tokens to generate exceeds ``max_length`` (default: the model's ``max_position_embeddings``) is
refused before anything is generated, or skipped and named (:mod:`drivekd.data.lengths`). Images are opened inside
the image root only and decoded with a pixel limit (:mod:`drivekd.data.images`).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from drivekd.data.cameras import CAMERAS
from drivekd.data.collate import VLMCollator, build_messages
from drivekd.data.images import ImageFileError, open_image
from drivekd.data.lengths import Overlong, limit_lengths, model_limit
from drivekd.data.schema import Sample
from drivekd.errors import DataError
from drivekd.evaluation.predictions import PredictionRecord, PredictionWriter
from drivekd.evaluation.progress import progress_bar
from drivekd.models.families import FamilyAdapter, family_of
from drivekd.models.pair import load_spec


@dataclass
class GenerationSummary:
    """What one call wrote: ``skipped`` samples already had a prediction in the file; ``overlong`` ones (id, tokens
    with the tokens to generate) were over ``max_length`` and left out."""

    written: int = 0
    skipped: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    max_length: int | None = None
    overlong: list[tuple[str, int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_model(
    name_or_path: str | Path, *, device: str = "cpu", dtype: str = "auto"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A hub id, a folder saved with ``save_pretrained`` or a LoRA student's adapter folder (a trained Drive-KD
    student, :func:`~drivekd.models.pair.load_spec`), on ``device``.

    ``device="auto"`` spreads a large model over the visible GPUs (``device_map="auto"``).
    """
    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    if device == "auto":
        model, processor = load_spec(name_or_path, dtype=torch_dtype, device_map="auto")
    else:
        model, processor = load_spec(name_or_path, dtype=torch_dtype)
        model = model.to(device)
    return model.eval(), processor


def eos_token_ids(model: PreTrainedModel) -> set[int]:
    """The ids that end generation (the generation config may hold one or a list)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def count_new_tokens(generated: torch.Tensor, eos_ids: set[int]) -> list[int]:
    """Per row of ``generated`` (B, T) (new tokens only): tokens up to and including the first end-of-sequence
    token, or all T when the row never ended. Later positions are padding of finished rows."""
    counts = []
    for row in generated.tolist():
        end = next((k for k, token in enumerate(row) if token in eos_ids), None)
        counts.append(len(row) if end is None else end + 1)
    return counts


def _batches(samples: Sequence[Sample], size: int) -> list[Sequence[Sample]]:
    return [samples[k : k + size] for k in range(0, len(samples), size)]


def _run(
    todo: Sequence[Sample],
    batch_size: int,
    answer: Callable[[Sequence[Sample]], list[tuple[str, int]]],
    writer: PredictionWriter,
    summary: GenerationSummary,
    progress: bool,
) -> GenerationSummary:
    """Answer ``todo`` batch by batch with ``answer`` (texts and new-token counts), writing each batch at once."""
    with progress_bar(len(todo), f"generate ({writer.model})", enabled=progress) as advance:
        for batch in _batches(todo, batch_size):
            start = time.perf_counter()
            answers = answer(batch)
            seconds = time.perf_counter() - start
            for sample, (text, tokens) in zip(batch, answers, strict=True):
                writer.write(
                    PredictionRecord(
                        id=sample.id,
                        prediction=text,
                        model=writer.model,
                        new_tokens=tokens,
                        seconds=seconds / len(batch),
                    )
                )
                summary.new_tokens += tokens
            summary.written += len(batch)
            summary.seconds += seconds
            advance(len(batch), rate=f"{summary.tokens_per_second:.1f} tok/s")
    return summary


def _todo(
    samples: Sequence[Sample],
    writer: PredictionWriter,
    collate: VLMCollator,
    limit: int | None,
    overlong: Overlong,
    max_new_tokens: int,
    source: str,
) -> tuple[list[Sample], GenerationSummary]:
    """The samples still to answer within ``limit`` tokens (prompt plus ``max_new_tokens``), and the summary so far."""
    todo = [s for s in samples if s.id not in writer.done]
    summary = GenerationSummary(skipped=len(samples) - len(todo))
    todo, lengths = limit_lengths(
        todo,
        collate.token_length,
        limit,
        overlong,
        source=source,
        setting="--max-length",
        skip="--overlong skip",
        extra=max_new_tokens,
        extra_what="tokens to generate",
    )
    summary.max_length, summary.overlong = lengths.limit, lengths.skipped
    return todo, summary


def generate_hf(
    samples: Sequence[Sample],
    model: PreTrainedModel,
    processor: ProcessorMixin,
    writer: PredictionWriter,
    *,
    image_root: Path | str,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    progress: bool = True,
    max_length: int | None = None,
    overlong: Overlong = "refuse",
    source: str = "<samples>",
) -> GenerationSummary:
    """Greedy Hugging Face generation over the samples that ``writer`` does not have yet.

    ``max_length``: tokens of prompt plus ``max_new_tokens`` a sample may take (default: the model's limit);
    ``overlong``: refuse such a sample (:class:`DataError` naming ``source`` and the row) or skip it.
    """
    family = family_of(model)
    collate = VLMCollator(
        processor, family.image_token_id(model), image_root=image_root, padding_side="left", with_answer=False
    )
    limit = max_length or model_limit(family.text_config(model))
    todo, summary = _todo(samples, writer, collate, limit, overlong, max_new_tokens, source)
    tokenizer = processor.tokenizer
    eos_ids = eos_token_ids(model)
    device, dtype = model.device, model.dtype

    @torch.no_grad()
    def answer(batch: Sequence[Sample]) -> list[tuple[str, int]]:
        inputs = {
            k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in collate(batch).inputs.items()
        }
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated = out[:, inputs["input_ids"].shape[1] :].cpu()
        counts = count_new_tokens(generated, eos_ids)
        texts = [
            tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(generated, counts, strict=True)
        ]
        return list(zip(texts, counts, strict=True))

    return _run(todo, batch_size, answer, writer, summary, progress)


def load_images(sample: Sample, root: Path) -> list[Image.Image]:
    """The sample's images as RGB, cameras in nuScenes order (the order the prompt names them); none if text-only.

    Paths must stay inside ``root``; images are decoded with a pixel limit."""
    images = []
    for index, image in enumerate(sample.shown_images):
        try:
            images.append(open_image(image.resolve(root)))
        except ImageFileError as err:
            raise DataError(
                str(root / image.path), sample.id, f"images.{index}.path", f"cannot read image: {err}"
            ) from None
    return images


def vllm_request(sample: Sample, processor: ProcessorMixin, root: Path) -> dict[str, Any]:
    """The vLLM request of ``sample``: the chat prompt and, unless the sample is text-only, its images (a text-only
    request carries no ``multi_modal_data`` at all, not an empty image list)."""
    prompt = processor.apply_chat_template(build_messages(sample), add_generation_prompt=True, tokenize=False)
    images = load_images(sample, root)
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}


def generate_vllm(
    samples: Sequence[Sample],
    model_path: str | Path,
    writer: PredictionWriter,
    *,
    image_root: Path | str,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    progress: bool = True,
    max_length: int | None = None,
    overlong: Overlong = "refuse",
    source: str = "<samples>",
    **llm_kwargs: Any,
) -> GenerationSummary:
    """Greedy vLLM generation with the same prompts (GPU only; untested on the CPU-only project machine); lengths
    are limited as in :func:`generate_hf`."""
    if not vllm_available():
        raise RuntimeError("the vLLM back end needs the vllm package (pip install vllm) and a GPU")
    from vllm import LLM, SamplingParams

    root = Path(image_root)
    config = AutoConfig.from_pretrained(model_path)
    family = family_of(config)
    processor = family.load_processor(model_path)
    collate = VLMCollator(processor, int(config.image_token_id), image_root=root, with_answer=False)
    limit = max_length or model_limit(config.get_text_config())
    todo, summary = _todo(samples, writer, collate, limit, overlong, max_new_tokens, source)
    llm = LLM(model=str(model_path), limit_mm_per_prompt={"image": len(CAMERAS)}, **llm_kwargs)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)

    def answer(batch: Sequence[Sample]) -> list[tuple[str, int]]:
        requests = [vllm_request(s, processor, root) for s in batch]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]

    return _run(todo, batch_size, answer, writer, summary, progress)


def checkpoint_family(path: str | Path) -> FamilyAdapter:
    """The family adapter of a checkpoint, read from its config."""
    return family_of(AutoConfig.from_pretrained(path))
