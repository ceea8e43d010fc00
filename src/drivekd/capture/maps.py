"""Head-mean attention probabilities recomputed from a layer's queries and keys (eq. 10).

Fused SDPA kernels never materialise the probabilities, so the maps are recomputed in (at least) fp32 from q and k,
only for the query rows that a loss needs, and in query chunks. The softmax normaliser is part of the gradient: a
detached log-sum-exp taken from a fused kernel gives wrong student gradients.

With ``recompute`` (a student) each chunk goes through :class:`HeadMeanProbs`, which keeps only q, k and the mask
and rebuilds the (H, c, L) probabilities in backward, so what stays in memory is the (c, L) head mean. Its backward
applies the softmax gradient of a head mean directly (every head receives dA/H), which is the same mathematics as
autograd through ``softmax(...).mean()`` with fewer passes over the probabilities.
"""

from __future__ import annotations

from typing import Any

import torch


def allowed_keys(
    attention_mask: torch.Tensor | None, query_positions: torch.Tensor, key_length: int
) -> torch.Tensor:
    """(B, Lq, Lk) bool: which keys each selected query may attend.

    ``attention_mask`` is what the model's mask function gave the attention layer: a boolean (B, 1, L, Lk) mask
    (True = attend), an additive float mask (0 = attend), or ``None`` when there is no padding and causality is
    implied. ``query_positions`` (B, Lq) are the absolute positions of the selected queries.
    """
    if attention_mask is None:
        keys = torch.arange(key_length, device=query_positions.device)
        return keys.view(1, 1, -1) <= query_positions.unsqueeze(-1)
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask == 0
    rows = query_positions.unsqueeze(-1).expand(-1, -1, mask.shape[-1])
    return torch.gather(mask.expand(query_positions.shape[0], -1, -1), 1, rows)


def _grouped(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, c, D) -> (B, Hkv, G, c, D) and k (B, Hkv, L, D) -> (B, Hkv, 1, L, D), in at least float32.

    Grouped-query attention is handled by grouping query heads over their shared key head, not by repeating k.
    """
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    return query.to(dtype).reshape(batch, kv_heads, heads // kv_heads, rows, dim), key.to(dtype).unsqueeze(2)


def _probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head softmax probabilities (B, Hkv, G, c, L); disallowed keys get the dtype's minimum score."""
    q, k = _grouped(query, key)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~allowed[:, None, None], torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


class HeadMeanProbs(torch.autograd.Function):
    """Head-mean softmax probabilities (eq. 10) that recompute the per-head probabilities in backward."""

    @staticmethod
    def forward(
        ctx: Any, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(query, key, allowed)
        ctx.scale = scale
        return _probs(query, key, allowed, scale).mean(dim=(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, allowed = ctx.saved_tensors
        total = query.shape[2]
        if total <= BACKWARD_ROWS:  # one block (a full-range slice of a vmapped grad has no batching rule)
            return *_head_mean_vjp(query, key, allowed, grad, ctx.scale), None, None
        # Query rows are independent softmaxes, so the backward walks them in blocks of BACKWARD_ROWS: the
        # per-head temporaries stay small, which matters most under a vmapped backward (K rows of each).
        grad_query, grad_key = [], None
        for start in range(0, total, BACKWARD_ROWS):
            rows = slice(start, start + BACKWARD_ROWS)
            block_query, block_key = _head_mean_vjp(
                query[:, :, rows], key, allowed[:, rows], grad[:, rows], ctx.scale
            )
            grad_query.append(block_query)
            grad_key = block_key if grad_key is None else grad_key + block_key
        return torch.cat(grad_query, dim=2), grad_key, None, None


BACKWARD_ROWS = 64


def _head_mean_vjp(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, grad: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the head-mean probabilities w.r.t. q and k for one block of query rows."""
    probs = _probs(query, key, allowed, scale)
    heads = probs.shape[1] * probs.shape[2]
    # Each head receives grad / H; softmax backward: dS = P * (dP - sum_j dP_j P_j).
    weighted = probs * grad.to(probs.dtype)[:, None, None]
    row = weighted.sum(dim=-1, keepdim=True)
    # In-place only on tensors derived from grad: under a vmapped backward (is_grads_batched) grad is
    # batched and probs is not, and an unbatched tensor cannot absorb a batched one in place.
    scores_grad = weighted.sub_(probs * row).mul_(scale / heads)
    # Masked scores are constants (masked_fill), so no gradient flows there. Where a row has any allowed key
    # the masked probabilities are exactly 0 and so is their gradient; only fully masked (padding) rows,
    # whose softmax is uniform, need zeroing.
    dead = ~allowed.any(dim=-1)
    if dead.any():
        scores_grad.masked_fill_(dead[:, None, None, :, None], 0)
    del probs
    q, k = _grouped(query, key)
    grad_query = torch.matmul(scores_grad, k).reshape(query.shape).to(query.dtype)
    grad_key = torch.matmul(scores_grad.transpose(-1, -2), q).sum(dim=2).to(key.dtype)
    return grad_query, grad_key


def head_mean_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    scale: float,
    *,
    chunk_size: int = 256,
    recompute: bool = False,
) -> torch.Tensor:
    """Head-mean probabilities of the selected query rows against all keys: (B, Lq, Lk).

    ``query`` holds only the selected rows (B, H, Lq, D) whose absolute positions are ``query_positions`` (B, Lq).
    """
    if query.shape[2] == 0:
        return query.new_zeros(
            query.shape[0], 0, key.shape[2], dtype=torch.promote_types(query.dtype, torch.float32)
        )
    chunks = []
    for start in range(0, query.shape[2], chunk_size):
        stop = start + chunk_size
        allowed = allowed_keys(attention_mask, query_positions[:, start:stop], key.shape[2])
        q = query[:, :, start:stop]
        if recompute and torch.is_grad_enabled():
            chunks.append(HeadMeanProbs.apply(q, key, allowed, scale))
        else:
            chunks.append(_probs(q, key, allowed, scale).mean(dim=(1, 2)))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
