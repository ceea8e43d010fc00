"""Stream a model over a pre-study set and compute every section-3.2 metric (the work of ``drivekd analyze``).

One no-grad forward per batch gives the hidden states (``output_hidden_states=True``), the head-mean maps of
every decoder layer (:class:`~drivekd.capture.recorder.AttentionRecorder`, full maps, no eager attention) and the
logits that predict the answer tokens (teacher forcing: the collator appends the reference answer). Samples are
processed image by image, and an image's per-question tensors are released as soon as its last question has
been seen, so memory holds one batch plus the open images, never the data set. Samples longer than
``max_length`` tokens (default: the model's ``max_position_embeddings``) are refused, or skipped and listed in the
report's ``data.lengths`` (:mod:`drivekd.data.lengths`).

Layer numbering is the paper's: layer 0 is the embeddings and layer l the output of decoder layer l. transformers
replaces ``hidden_states[N]`` with the final-normed output; here layer N is the raw output of the last decoder
layer (taken by a forward hook), as eq. 1 defines it. The adjacent cosine of layer N - 1 against the final-normed
output is reported beside it (``last_with_final_norm``).

Token positions: the question's "last non-special token" (eq. 4) is its last text token before the answer span;
the hidden vector of a question for dispersion (section 3.2.2) is the last text token of the teacher-forced
answer; confidence (eqs. 6-8) is read at every text token of the answer (the end-of-turn marker is special and
left out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.analysis.confidence import TEMPERATURES, Confidence
from drivekd.analysis.dataset import ImageKey, PrestudySet, image_key
from drivekd.analysis.metrics import AdjacentCosine, Dispersion, IntraConsistency, VisionTextCosine
from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import Batch, VLMCollator
from drivekd.data.lengths import LengthReport, Overlong, limit_lengths, model_limit
from drivekd.data.schema import CAPABILITIES, Sample
from drivekd.errors import DataError
from drivekd.models.families import FamilyAdapter


@dataclass(frozen=True)
class AnalysisOptions:
    """Knobs of an analysis run."""

    batch_size: int = 2
    temperatures: tuple[float, ...] = TEMPERATURES
    bins: int = 10
    dispersion_questions: int | None = 16  # per image; bounds the maps held at once (N L^2 floats each)
    folds: int = 4  # image folds for the standard error of the intra curves
    chunk_size: int = 256  # query chunk of the attention-map recomputation
    max_length: int | None = None  # tokens a sample may take; default: the model's max_position_embeddings
    overlong: Overlong = "refuse"  # a sample over max_length: an error, or skipped and listed

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.overlong not in ("refuse", "skip"):
            raise ValueError(f"overlong must be refuse or skip, got {self.overlong!r}")
        _Metrics(1, self)  # the accumulators check their settings: bad options fail before a model is loaded


Progress = Callable[[str, int, int], None]


def analyze(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    family: FamilyAdapter,
    data: PrestudySet,
    general: PrestudySet | None = None,
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every metric of section 3.2 for ``model`` on ``data`` (and confidence on ``general``), JSON-ready."""
    options = options or AnalysisOptions()
    model.eval()
    use_capture_attention(model)
    layers = len(family.decoder_layers(model))
    metrics = _Metrics(layers, options)
    plan = CapturePlan.of(full=range(layers), chunk_size=options.chunk_size)
    collate = _collator(processor, family, model, data)
    limit = options.max_length or model_limit(family.text_config(model))
    data, lengths = _within_limit(data, collate, limit, options)
    if general is not None:
        general, general_lengths = _within_limit(
            general, _collator(processor, family, model, general), limit, options
        )
    remaining = {key: len(group) for key, group in data.by_image()}
    ordered = [s for _, group in data.by_image() for s in group]
    for done, chunk in _batches(ordered, options.batch_size):
        batch = _to_model(collate(chunk), model)
        keep, rows = _logit_rows(batch, data.file, chunk)
        with (
            torch.no_grad(),
            AttentionRecorder(model, plan, grad=False) as recorder,
            _raw_output(family, model) as raw,
        ):
            recorder.start()
            out = model(**batch.inputs, output_hidden_states=True, logits_to_keep=keep)
            maps = recorder.collect().full
        hidden = [*out.hidden_states[:layers], raw["output"]]
        metrics.add(data, chunk, batch, hidden, out.hidden_states[layers], maps)
        for b, sample in enumerate(chunk):
            metrics.confidence.update(out.logits[b, rows[b]], data.domain_of(sample))
        for sample in chunk:
            key = image_key(sample)
            remaining[key] -= 1
            if remaining[key] == 0:
                metrics.close(key)
        if progress:
            progress(data.file, done, len(ordered))
    if general is not None:
        _general_confidence(
            model, processor, family, general, options.batch_size, metrics.confidence, progress
        )
    hidden_size = int(family.text_config(model).hidden_size)
    summary = _data_summary(data, general) | {"lengths": lengths.as_json()}
    if general is not None:
        summary["general_lengths"] = general_lengths.as_json()
    return {
        "model": {"family": family.name, "num_layers": layers, "hidden_size": hidden_size},
        "data": summary,
        **metrics.report(),
    }


def _within_limit(
    data: PrestudySet, collate: VLMCollator, limit: int | None, options: AnalysisOptions
) -> tuple[PrestudySet, LengthReport]:
    """``data`` without the samples over ``limit`` tokens (refused unless ``options.overlong`` is skip)."""
    kept, report = limit_lengths(
        data.samples,
        collate.token_length,
        limit,
        options.overlong,
        source=data.file,
        setting="--max-length",
        skip="--overlong skip",
    )
    if not kept:
        raise DataError(
            data.file, None, None, f"no sample is within {limit} tokens", hint="raise --max-length"
        )
    ids = {s.id for s in kept}
    return replace(data, samples=kept, groups={k: v for k, v in data.groups.items() if k in ids}), report


class _Metrics:
    """The accumulators of one run and how a batch feeds them."""

    def __init__(self, layers: int, options: AnalysisOptions) -> None:
        self.layers = layers
        self.options = options
        self.adjacent, self.final_norm = AdjacentCosine(), AdjacentCosine()
        self.vision_text = VisionTextCosine()
        self.intra = IntraConsistency(folds=options.folds)
        self.dispersion = Dispersion(options.dispersion_questions)
        self.confidence = Confidence(options.temperatures, options.bins)

    def add(
        self,
        data: PrestudySet,
        chunk: Sequence[Sample],
        batch: Batch,
        hidden: Sequence[torch.Tensor],
        normed_last: torch.Tensor,
        maps: dict[int, torch.Tensor],
    ) -> None:
        """``hidden``: layers 0..N (N raw); ``normed_last``: the final-normed layer N; ``maps``: (B, L, L) per
        0-based decoder layer."""
        roles = batch.roles
        self.adjacent.update(hidden, roles.valid)
        self.final_norm.update([hidden[self.layers - 1], normed_last], roles.valid)
        self.vision_text.update(hidden, roles.vision, roles.text)
        question = _last(roles.text & ~roles.answer, data.file, chunk, "question")
        answer = _last(roles.text & roles.answer, data.file, chunk, "answer")
        rows = torch.arange(len(chunk), device=question.device)
        self.intra.update(
            torch.stack([h[rows, question] for h in hidden], dim=1),
            [image_key(s) for s in chunk],
            [s.capability for s in chunk],
        )
        for b, sample in enumerate(chunk):
            length = int(roles.valid[b].sum())  # right padding: the sample's tokens come first
            self.dispersion.add(
                image_key(sample),
                sample.capability,
                data.groups.get(sample.id),
                torch.stack([h[b, answer[b]] for h in hidden[1:]]),
                torch.stack([maps[k][b, :length, :length] for k in range(self.layers)]),
            )

    def close(self, image: ImageKey) -> None:
        self.intra.close(image)
        self.dispersion.close(image)

    def report(self) -> dict[str, Any]:
        layers = self.layers
        values, stderr, images = self.intra.result(), self.intra.standard_errors(), self.intra.images()
        return {
            "layer_numbering": (
                "paper: 0 = embeddings, l = output of decoder layer l (1..N); layer N is the raw output of the "
                "last decoder layer, before the final norm"
            ),
            "adjacent_cosine": {
                "layers": list(range(layers)),
                "values": self.adjacent.result(),
                "tokens": self.adjacent.tokens,
                "last_with_final_norm": (self.final_norm.result() or [None])[0],
            },
            "vision_text_cosine": {
                "layers": list(range(layers + 1)),
                "values": self.vision_text.result(),
                "samples": self.vision_text.samples,
            },
            "intra_consistency": {
                "layers": list(range(layers + 1)),
                "by_capability": {c: values.get(c) for c in CAPABILITIES},
                "stderr": {c: stderr.get(c) for c in CAPABILITIES},
                "images": {c: images.get(c, 0) for c in CAPABILITIES},
                "folds": self.intra.folds,
            },
            "dispersion": {
                "layers": list(range(1, layers + 1)),
                "max_questions_per_image": self.options.dispersion_questions,
                **self.dispersion.result(),
            },
            "confidence": self.confidence.result(),
        }


def _data_summary(data: PrestudySet, general: PrestudySet | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "path": data.file,
        "samples": len(data.samples),
        "images": sum(1 for _ in data.by_image()),
        "by_capability": {c: sum(s.capability == c for s in data.samples) for c in CAPABILITIES},
        "in_paraphrase_groups": len(data.groups),
    }
    if general is not None:
        summary |= {"general_path": general.file, "general_samples": len(general.samples)}
    return summary


def _general_confidence(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    family: FamilyAdapter,
    general: PrestudySet,
    batch_size: int,
    confidence: Confidence,
    progress: Progress | None,
) -> None:
    """Only confidence is measured on the general set (section 3.2.3); no hidden states or maps."""
    collate = _collator(processor, family, model, general)
    for done, chunk in _batches(general.samples, batch_size):
        batch = _to_model(collate(chunk), model)
        keep, rows = _logit_rows(batch, general.file, chunk)
        with torch.no_grad():
            logits = model(**batch.inputs, logits_to_keep=keep).logits
        for b, sample in enumerate(chunk):
            confidence.update(logits[b, rows[b]], general.domain_of(sample))
        if progress:
            progress(general.file, done, len(general.samples))


def _collator(
    processor: ProcessorMixin, family: FamilyAdapter, model: PreTrainedModel, data: PrestudySet
) -> VLMCollator:
    """Answers included (teacher forcing), right padding so that positions align from the left."""
    return VLMCollator(
        processor, family.image_token_id(model), image_root=data.image_root, padding_side="right"
    )


def _batches(samples: Sequence[Sample], size: int) -> Iterator[tuple[int, list[Sample]]]:
    for start in range(0, len(samples), size):
        chunk = list(samples[start : start + size])
        yield start + len(chunk), chunk


def _to_model(batch: Batch, model: PreTrainedModel) -> Batch:
    """Move the batch to the model's device, with floating inputs (pixels) in the model's dtype."""
    moved = batch.to(model.device)
    moved.inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in moved.inputs.items()}
    return moved


def _logit_rows(batch: Batch, file: str, chunk: Sequence[Sample]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Positions whose logits to keep (those predicting an answer text token) and, per sample, which kept rows
    predict its answer tokens in order."""
    targets = batch.roles.answer & batch.roles.text
    _last(targets, file, chunk, "answer")  # every answer needs a text token
    keep = torch.unique(targets.nonzero()[:, 1] - 1)
    row_of = torch.full((targets.shape[1],), -1, dtype=torch.long, device=keep.device)
    row_of[keep] = torch.arange(len(keep), device=keep.device)
    return keep, [row_of[targets[b].nonzero()[:, 0] - 1] for b in range(targets.shape[0])]


def _last(mask: torch.Tensor, file: str, chunk: Sequence[Sample], what: str) -> torch.Tensor:
    """(B,) position of the last True entry per row; a named error for a row with none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    for b in (last < 0).nonzero()[:, 0].tolist():
        raise DataError(file, f"id {chunk[b].id!r}", what, f"the {what} has no text token after tokenisation")
    return last


@contextmanager
def _raw_output(family: FamilyAdapter, model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor]]:
    """Record the last decoder layer's own output (before the final norm) of the next forward."""
    record: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        record["output"] = output[0] if isinstance(output, tuple) else output

    handle = family.decoder_layers(model)[-1].register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
