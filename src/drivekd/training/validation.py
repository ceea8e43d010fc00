"""Evaluation on a validation split during training (``data.val``) and the choice of the best checkpoint.

Every ``run.eval_every`` optimizer steps and after the last one, the first ``run.eval_max_samples`` samples of
``data.val`` (of the trained capabilities, within the training token limit) are scored without gradients, with the
training objective's terms normalised over the whole split as one window (as training normalises over its window):
``val/<term>`` is a term summed over capabilities, ``val/loss`` their unweighted sum (``loss`` in training records).
MCQ samples are also answered greedily and ``val/mcq_accuracy`` is the share whose chosen letter
(:func:`drivekd.evaluation.extract_choice`) is the right one. A result better in ``run.best_metric`` than the kept
one (lower, or higher for an accuracy) is kept as ``best/`` by the trainer (:func:`checkpoint.save_best`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from drivekd.data.collate import VLMCollator
from drivekd.data.lengths import limit_lengths
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DriveKDError
from drivekd.evaluation import extract_choice
from drivekd.training import checkpoint as ckpt

if TYPE_CHECKING:
    from drivekd.training.trainer import Trainer

MAX_NEW_TOKENS = 16  # an MCQ answer is a letter, perhaps with its option text


class ValidationError(DriveKDError):
    """The validation split or ``run.best_metric`` cannot be used."""


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


class Validation:
    """The val split of one run, its evaluation, and the best result so far (restored from ``best/``)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        config = trainer.config
        data = config.data
        root = Path(data.image_root) if data.image_root else None
        samples = [
            s
            for s in read_jsonl(data.val, image_root=root, allow_outside_root=data.allow_outside_root)
            if s.capability in config.capabilities
        ][: config.run.eval_max_samples]
        self.collate = VLMCollator(
            trainer.models.processor,
            trainer.collate.image_token_id,
            image_root=data.image_root or str(Path(data.val).parent),
            padding_side=data.padding_side,
            allow_outside_root=data.allow_outside_root,
            answer_order=data.answer_order,
        )
        self.samples, _ = limit_lengths(
            samples,
            self.collate.token_length,
            trainer.lengths.limit,
            data.overlong,
            source=data.val,
            setting="data.max_length",
            skip="data.overlong=skip",
        )
        if not self.samples:
            raise ValidationError(f"data.val {data.val} holds no sample of {', '.join(config.capabilities)}")
        self.metric = config.run.best_metric
        known = {"val/loss", *(f"val/{name}" for name in trainer.recipe.names)}
        known |= {"val/mcq_accuracy"} if any(s.kind == "mcq" for s in self.samples) else set()
        if self.metric not in known:
            raise ValidationError(
                f"run.best_metric={self.metric} is not a validation metric of this run and data.val "
                f"{data.val}; use one of {', '.join(sorted(known))}"
            )
        kept = ckpt.best_checkpoint(trainer.output_dir)
        self.best: float | None = kept[1].get(self.metric) if kept else None

    def due(self, step: int) -> bool:
        return step % self.trainer.config.run.eval_every == 0 or step == self.trainer.total_steps

    def _batches(self, collate: VLMCollator) -> list[Any]:
        size = self.trainer.config.data.micro_batch
        device = self.trainer.device
        return [collate(self.samples[k : k + size]).to(device) for k in range(0, len(self.samples), size)]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The split's per-term losses and MCQ accuracy (student in eval mode meanwhile)."""
        trainer = self.trainer
        student = trainer.models.student
        student.eval()
        try:
            batches = self._batches(self.collate)
            window = trainer.objective.window([(b, trainer.index_of(b)) for b in batches])
            totals: dict[str, float] = defaultdict(float)
            for batch in batches:
                for term in trainer.forward_terms(batch, window, grad=False):
                    totals[f"val/{term.name}"] += float(term.value)
            totals["val/loss"] = sum(totals.values())
            mcq = [s for s in self.samples if s.kind == "mcq"]
            if mcq:
                totals["val/mcq_accuracy"] = self._accuracy(mcq)
        finally:
            student.train()
        return dict(totals)

    def _accuracy(self, samples: Sequence[Sample]) -> float:
        trainer = self.trainer
        collate = VLMCollator(
            trainer.models.processor,
            self.collate.image_token_id,
            image_root=self.collate.image_root,
            padding_side="left",
            allow_outside_root=self.collate.allow_outside_root,
            with_answer=False,
        )
        tokenizer = trainer.models.processor.tokenizer
        size = trainer.config.data.micro_batch
        right = 0
        for k in range(0, len(samples), size):
            chunk = samples[k : k + size]
            dtype = trainer.models.student.dtype
            inputs = {
                k: v.to(dtype) if v.is_floating_point() else v
                for k, v in collate(chunk).to(trainer.device).inputs.items()
            }
            out = trainer.models.student.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            right += sum(
                extract_choice(text) is not None and extract_choice(text) == extract_choice(s.answer)
                for text, s in zip(texts, chunk, strict=True)
            )
        return right / len(samples)

    def improved(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` beat the kept best in ``run.best_metric`` (and become the best)."""
        value = metrics[self.metric]
        better = higher_is_better(self.metric)
        if self.best is not None and (value <= self.best if better else value >= self.best):
            return False
        self.best = value
        return True
