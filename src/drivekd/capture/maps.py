"""Head-mean attention probabilities recomputed from a layer's queries and keys (eq. 10).

Fused SDPA kernels never materialise the probabilities, so the maps are recomputed in fp32 from q and k, only for
the query rows that a loss needs, and in query chunks. The softmax normaliser stays inside autograd: a detached
log-sum-exp taken from a fused kernel gives wrong student gradients. With ``checkpoint_chunks`` each chunk's (H, c, L)
probabilities are recomputed in backward instead of being kept, so the memory left behind is the (c, L) head mean.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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


def _head_mean_probs(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax probabilities averaged over heads: q (B, H, Lq, D), k (B, Hkv, Lk, D) -> (B, Lq, Lk).

    Computed in at least float32 (float64 inputs stay float64). Grouped-query attention is handled by grouping
    query heads over their shared key head instead of repeating k.
    """
    batch, heads, lq, dim = query.shape
    kv_heads = key.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(batch, kv_heads, heads // kv_heads, lq, dim)
    scores = torch.matmul(q, key.to(dtype).unsqueeze(2).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None, None], torch.finfo(dtype).min)
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def head_mean_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    scale: float,
    *,
    chunk_size: int = 256,
    checkpoint_chunks: bool = False,
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
        if checkpoint_chunks and torch.is_grad_enabled():
            chunks.append(checkpoint(_head_mean_probs, q, key, allowed, scale, use_reentrant=False))
        else:
            chunks.append(_head_mean_probs(q, key, allowed, scale))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
