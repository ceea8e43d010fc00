"""Head-mean attention probabilities recomputed from a layer's queries and keys (eq. 10).

Fused SDPA kernels never materialise the probabilities, so the maps are recomputed in (at least) fp32 from q and k,
only for the query rows that a loss needs, and in query chunks. The softmax normaliser is part of the gradient: a
detached log-sum-exp taken from a fused kernel gives wrong student gradients.

With ``recompute`` (a student) each chunk goes through :class:`HeadMeanProbs`, which keeps only q, k and the mask
and rebuilds the (H, c, L) probabilities in backward, so what stays in memory is the (c, L) head mean. Its backward
applies the softmax gradient of a head mean directly (every head receives dA/H), which is the same mathematics as
autograd through ``softmax(...).mean()`` with fewer passes over the probabilities.

Where a student layer needs its whole map (the reasoning signal) and is not checkpointed,
:func:`attention_with_head_mean` computes the layer output from the same probabilities instead of a separate SDPA
call: one pass over the (H, L, L) scores gives both, and its backward rebuilds them once for the gradients of the
output and of the map together, where SDPA plus :class:`HeadMeanProbs` build them three times. The output is eager
attention in (at least) fp32.
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
    """q (B, H, c, D) -> (B, Hkv, G, c, D) and k (B, Hkv, L, D) -> (B * Hkv, L, D), in at least float32.

    Grouped-query attention is handled by grouping query heads over their shared key head, not by repeating k:
    the G query heads of a key head and their c rows form one (G * c)-row block of a batched matmul.
    """
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(batch, kv_heads, heads // kv_heads, rows, dim)
    return q, key.to(dtype).reshape(batch * kv_heads, key.shape[2], dim)


def _flat(grouped: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, G, c, X) -> (B * Hkv, G * c, X), the batched-matmul layout."""
    batch, kv_heads, groups, rows, last = grouped.shape
    return grouped.reshape(batch * kv_heads, groups * rows, last)


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B * Hkv, G * c, X) -> (B, Hkv, G, c, X) with the leading dimensions of ``like``."""
    return flat.view(*like.shape[:4], flat.shape[-1])


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, c, L): 0 where a key is allowed, the dtype's minimum elsewhere (one add, not a fill)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def _softmax(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax probabilities (B * Hkv, G * c, L) of grouped q (B, Hkv, G, c, D) against k (B * Hkv, L, D)."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the scores in bf16
        scores = torch.bmm(_flat(q * scale), k.transpose(1, 2))
    _unflat(scores, q).add_(bias[:, None, None])
    return scores.softmax(dim=-1)


def _probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head softmax probabilities (B, Hkv, G, c, L) of q (B, H, c, D) and k (B, Hkv, L, D)."""
    q, k = _grouped(query, key)
    return _unflat(_softmax(q, k, _bias(allowed, q.dtype), scale), q)


class HeadMeanProbs(torch.autograd.Function):
    """Head-mean softmax probabilities (eq. 10) that recompute the per-head probabilities in backward."""

    @staticmethod
    def forward(
        ctx: Any, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(query, key, allowed)
        ctx.scale = scale
        ctx.blocks = _blocks(allowed)  # one device sync per layer, reused by backward
        return _head_means(query, key, allowed, scale, ctx.blocks)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, allowed = ctx.saved_tensors
        # Query rows are independent softmaxes, so the backward walks them in blocks of BACKWARD_ROWS: the
        # per-head temporaries stay small, which matters most under a vmapped backward (K rows of each).
        grad_query, grad_key = [], None
        for rows, keys in ctx.blocks:
            block_query, block_key = _head_mean_vjp(
                _rows(query, 2, rows),
                _rows(key, 2, keys),
                _rows(_rows(allowed, 1, rows), 2, keys),
                _rows(_rows(grad, 1, rows), 2, keys),
                ctx.scale,
            )
            grad_query.append(block_query)
            block_key = _pad_rows(block_key, key.shape[2])
            grad_key = block_key if grad_key is None else grad_key + block_key
        return torch.cat(grad_query, dim=2), grad_key, None, None


BACKWARD_ROWS = 64


def _blocks(allowed: torch.Tensor) -> list[tuple[slice | None, slice | None]]:
    """Blocks of BACKWARD_ROWS query rows of an (B, Lq, Lk) mask, each with the leading keys its rows may attend.

    A causal row attends no key after its own position, so a block of early rows skips the later keys (about half
    the work of a whole causal map); a block holding a fully masked row (padding, whose softmax is uniform over
    every key) keeps them all. ``None`` for a slice that covers its whole dimension, which must not be sliced (a
    full-range slice of a vmapped gradient has no batching rule). One device sync per call.
    """
    total, keys = allowed.shape[1], allowed.shape[2]
    if total == 0:
        return []
    positions = torch.arange(1, keys + 1, device=allowed.device)
    reach = torch.where(allowed, positions, 0).amax(dim=-1)  # (B, Lq): last allowed key + 1, 0 if none
    reach = torch.where(reach == 0, keys, reach).amax(dim=0)  # (Lq,): over the batch; padding rows need all
    starts = list(range(0, total, BACKWARD_ROWS))
    padded = torch.nn.functional.pad(reach, (0, len(starts) * BACKWARD_ROWS - total))
    limits = padded.view(len(starts), BACKWARD_ROWS).amax(dim=1).tolist()

    def part(start: int, stop: int, size: int) -> slice | None:
        return None if start == 0 and stop >= size else slice(start, min(stop, size))

    return [
        (part(start, start + BACKWARD_ROWS, total), part(0, limit, keys))
        for start, limit in zip(starts, limits, strict=True)
    ]


def _rows(tensor: torch.Tensor, dim: int, rows: slice | None) -> torch.Tensor:
    return tensor if rows is None else tensor.narrow(dim, rows.start, rows.stop - rows.start)


def _pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Zero rows appended along dim -2 up to ``size`` (gradients of the keys a block did not reach)."""
    missing = size - tensor.shape[-2]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, 0, 0, missing))


def _pad_keys(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Zero columns appended along the last dim up to ``size`` (the probabilities of keys a block did not reach)."""
    missing = size - tensor.shape[-1]
    return tensor if missing == 0 else torch.nn.functional.pad(tensor, (0, missing))


def _head_means(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    blocks: list[tuple[slice | None, slice | None]],
) -> torch.Tensor:
    """Head-mean probabilities (B, c, L) of q (B, H, c, D) against k (B, Hkv, L, D) over ``_blocks(allowed)``."""
    maps = [
        _pad_keys(
            _probs(
                _rows(query, 2, rows), _rows(key, 2, keys), _rows(_rows(allowed, 1, rows), 2, keys), scale
            ).mean(dim=(1, 2)),
            key.shape[2],
        )
        for rows, keys in blocks
    ]
    return torch.cat(maps, dim=1)


def _scores_grad(
    probs: torch.Tensor, grad_probs: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax backward dS = P * (dP - sum_j dP_j P_j) * scale, (B, Hkv, G, c, L).

    ``grad_probs`` is the caller's temporary and is overwritten when it has the full shape (it may broadcast).
    In place only on tensors derived from the gradient: under a vmapped backward (is_grads_batched) they are
    batched and ``probs`` is not, and an unbatched tensor cannot absorb a batched one. Masked scores are constants,
    so no gradient flows there: where a row has any allowed key the masked probabilities are exactly 0 and so is
    their gradient; only fully masked (padding) rows, whose softmax is uniform, need zeroing.
    """
    row = (probs * grad_probs).sum(dim=-1, keepdim=True)
    full = grad_probs.shape == probs.shape
    scores_grad = (grad_probs.sub_(row) if full else grad_probs - row).mul_(probs).mul_(scale)
    dead = ~allowed.any(dim=-1)
    if dead.any():
        scores_grad = scores_grad.masked_fill_(dead[:, None, None, :, None], 0)
    return scores_grad


def _head_mean_vjp(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, grad: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the head-mean probabilities w.r.t. q and k for one block of query rows."""
    q, k = _grouped(query, key)
    probs = _unflat(_softmax(q, k, _bias(allowed, q.dtype), scale), q)
    heads = q.shape[1] * q.shape[2]
    # Each head receives grad / H.
    scores_grad = _flat(_scores_grad(probs, grad.to(probs.dtype)[:, None, None] / heads, allowed, scale))
    del probs
    grad_query = torch.bmm(scores_grad, k).reshape(query.shape).to(query.dtype)
    grad_key = torch.bmm(scores_grad.transpose(1, 2), _flat(q)).reshape(key.shape).to(key.dtype)
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
            chunks.append(_head_means(q, key, allowed, scale, _blocks(allowed)))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class AttentionHeadMean(torch.autograd.Function):
    """A causal attention layer's output (B, H, L, D) and its head-mean map (B, L, L) from one set of probabilities.

    Saves q, k, v and the mask only; backward rebuilds each block of probabilities once and applies the gradients
    of the output and of the map together: dP = dO V^T + dA / H, then the softmax backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(query, key, value, allowed)
        ctx.scale = scale
        ctx.blocks = _blocks(allowed)  # one device sync per layer, reused by backward
        q, k = _grouped(query, key)
        v = value.to(q.dtype).reshape(k.shape)
        bias = _bias(allowed, q.dtype)
        outputs, maps = [], []
        for rows, keys in ctx.blocks:
            block = _rows(q, 3, rows)
            probs = _softmax(block, _rows(k, 1, keys), _rows(_rows(bias, 1, rows), 2, keys), scale)
            with torch.autocast(q.device.type, enabled=False):
                outputs.append(_unflat(torch.bmm(probs, _rows(v, 1, keys)), block))
            maps.append(_pad_keys(_unflat(probs, block).mean(dim=(1, 2)), k.shape[1]))
        output = torch.cat(outputs, dim=3).reshape(query.shape).to(query.dtype)
        return output, torch.cat(maps, dim=1)

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, grad_map: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(grad_output.device.type, enabled=False):
            return AttentionHeadMean._backward(ctx, grad_output, grad_map)

    @staticmethod
    def _backward(
        ctx: Any, grad_output: torch.Tensor, grad_map: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        query, key, value, allowed = ctx.saved_tensors
        q, k = _grouped(query, key)
        v = value.to(q.dtype).reshape(k.shape)
        bias = _bias(allowed, q.dtype)
        heads = q.shape[1] * q.shape[2]
        grad_out = grad_output.to(q.dtype).reshape(q.shape)
        grad_map = grad_map.to(q.dtype) / heads  # each head receives dA / H
        grad_query, grad_key, grad_value = [], None, None
        for rows, keys in ctx.blocks:
            block, out_block = _rows(q, 3, rows), _flat(_rows(grad_out, 3, rows))
            block_k, block_v = _rows(k, 1, keys), _rows(v, 1, keys)
            probs = _softmax(block, block_k, _rows(_rows(bias, 1, rows), 2, keys), ctx.scale)
            value_part = _pad_rows(torch.bmm(probs.transpose(1, 2), out_block), k.shape[1])
            grad_probs = (
                _unflat(torch.bmm(out_block, block_v.transpose(1, 2)), block)
                + _rows(_rows(grad_map, 1, rows), 2, keys)[:, None, None]
            )
            block_allowed = _rows(_rows(allowed, 1, rows), 2, keys)
            scores_grad = _flat(_scores_grad(_unflat(probs, block), grad_probs, block_allowed, ctx.scale))
            grad_query.append(_unflat(torch.bmm(scores_grad, block_k), block))
            key_part = _pad_rows(torch.bmm(scores_grad.transpose(1, 2), _flat(block)), k.shape[1])
            grad_key = key_part if grad_key is None else grad_key + key_part
            grad_value = value_part if grad_value is None else grad_value + value_part
        grad_q = torch.cat(grad_query, dim=3).reshape(query.shape).to(query.dtype)
        return (
            grad_q,
            grad_key.reshape(key.shape).to(key.dtype),
            grad_value.reshape(value.shape).to(value.dtype),
            None,
            None,
        )


def attention_with_head_mean(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention output (B, H, L, D) in q's dtype and the head-mean map (B, L, L) in at least fp32.

    ``attention_mask`` is what the layer's mask function gave (see :func:`allowed_keys`); q (B, H, L, D) and k, v
    (B, Hkv, L, D) cover the same L positions.
    """
    length = query.shape[2]
    positions = torch.arange(length, device=query.device).expand(query.shape[0], -1)
    return AttentionHeadMean.apply(query, key, value, allowed_keys(attention_mask, positions, length), scale)
