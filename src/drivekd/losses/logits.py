"""Token-level KL baseline on the answer span (the output-distribution signal section 3.2 argues against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drivekd.losses.attention import at_least_float32
from drivekd.losses.supervised import answer_logits


def answer_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over answer tokens of T^2 * KL(p_teacher^T || p_student^T), with the shift of ``token_nll``.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ (student {student_logits.shape[-1]}, teacher "
            f"{teacher_logits.shape[-1]}): token-level KL needs teacher and student to share a tokenizer"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student, _ = answer_logits(student_logits, labels)
    teacher, _ = answer_logits(teacher_logits, labels)
    log_p_student = F.log_softmax(at_least_float32(student) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(at_least_float32(teacher) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl * temperature**2 / max(student.shape[0], 1)
