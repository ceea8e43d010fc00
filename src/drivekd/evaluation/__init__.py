"""Evaluation: DriveBench-compatible generation, MCQ scoring, an LLM judge run N times, correlations and
deployment metrics (paper sections 4.1, 4.3, appendices D.2-D.4). See docs/evaluation.md."""

from drivekd.evaluation.choices import extract_choice

__all__ = ["extract_choice"]
