"""DriveLM challenge metrics (optional): accuracy as raw string equality, ROUGE-L and BLEU (no Java needed).

Accuracy compares the prediction and the answer exactly, as the DriveLM challenge does for its MCQ and yes/no
questions (a model must answer with the bare letter or "Yes."/"No." to score). ROUGE-L (F-measure, ``rouge-score``)
and corpus BLEU-4 (``sacrebleu``) are computed on open questions; missing predictions count as empty strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

from drivekd.evaluation.scoring import EvalItem


def accuracy(pairs: list[tuple[str, str]]) -> float | None:
    """Share (%) of (prediction, answer) pairs that are exactly equal."""
    return 100.0 * sum(p == a for p, a in pairs) / len(pairs) if pairs else None


def rouge_l(pairs: list[tuple[str, str]]) -> float | None:
    """Mean ROUGE-L F-measure (%) of predictions against answers."""
    if not pairs:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100.0 * sum(scorer.score(a, p)["rougeL"].fmeasure for p, a in pairs) / len(pairs)


def bleu(pairs: list[tuple[str, str]]) -> float | None:
    """Corpus BLEU-4 (sacrebleu's default tokenisation) of predictions against answers."""
    if not pairs:
        return None
    predictions, answers = zip(*pairs, strict=True)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(answers)]).score)


def drivelm_metrics(items: Iterable[EvalItem]) -> dict[str, Any]:
    """Accuracy on MCQ + yes/no questions, ROUGE-L and BLEU on open ones."""
    closed, open_ = [], []
    for item in items:
        pair = (item.prediction or "", item.sample.answer)
        (open_ if item.sample.kind == "open" else closed).append(pair)
    return {
        "accuracy": accuracy(closed),
        "accuracy_questions": len(closed),
        "rouge_l": rouge_l(open_),
        "bleu": bleu(open_),
        "open_questions": len(open_),
    }
