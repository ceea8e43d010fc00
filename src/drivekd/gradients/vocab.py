"""Gram blocks of the vocabulary-sized matrices (input embedding, LM head; possibly one tied tensor).

Their per-row gradients would cost K x V x D, so they are never formed:

* LM head, from the Gram identity <D_i^T X, D_j^T X> = <D_i, (X X^T) D_j> over the kept logit positions;
* embedding, from its output gradient summed per used token id;
* tied, their cross terms through the used token ids.

With owner groups (:mod:`drivekd.gradients.owners`) each of the K rows is split by the group owning each position,
giving (groups x K) rows in group-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drivekd.gradients.taps import TapState


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _one_hot(owner: torch.Tensor | None, like: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups, positions) indicator of each group's positions of ``like`` (K, N, V); all of them when unsplit."""
    if groups == 1 or owner is None:
        return like.new_ones(1, like.shape[1])
    return F.one_hot(owner.to(like.device), groups).to(like.dtype).T


@dataclass
class VocabRecord:
    """Gram blocks of the embedding and LM-head weights of one forward."""

    state: TapState
    tied: bool
    token_ids: torch.Tensor | None = None  # (N_e,) ids fed to the embedding
    token_owner: torch.Tensor | None = None  # (N_e,) owner group of each id's position
    head_inputs: torch.Tensor | None = None  # (N_h, D) hidden states fed to the LM head
    head_owner: torch.Tensor | None = None  # (N_h,) owner group of each head position
    head_used: torch.Tensor | None = None  # (G*K, N_h, U) head output gradient at the embedding's used tokens
    used: torch.Tensor | None = None  # (U,) unique used token ids

    def release(self) -> None:
        """Drop the saved ids and head inputs once the Gramian is taken (see ModuleCall.release)."""
        self.token_ids = self.token_owner = self.head_inputs = self.head_owner = self.head_used = (
            self.used
        ) = None

    def consume_head(self, grad: torch.Tensor) -> None:
        """grad: (K, N_h, V), gathered over ranks along positions; blocks summed group by group."""
        k, groups = grad.shape[0], self.state.groups
        d = self.state.gather(_float(grad.reshape(k, -1, grad.shape[-1])), 1)
        x = self.state.gather(self.head_inputs, 0).to(d.dtype)
        self.head_inputs = x
        owner = self.state.gather(self.head_owner, 0) if groups > 1 else None
        onehot = _one_hot(owner, d, groups)  # (G, N)
        xx = x @ x.T
        block = d.new_zeros(groups, k, groups, k)
        for h in range(groups):
            columns = onehot[h].nonzero().flatten()
            for t in range(k):
                # E[n] = sum_{m in h} (x_n . x_m) D_t[m]; then <D_s[n], E[n]> summed over the positions of g.
                e = xx[:, columns] @ d[t, columns]
                block[:, :, h, t] = (torch.einsum("snv,nv->sn", d, e) @ onehot.T).T
        self.state.add(block.reshape(groups * k, groups * k))
        if self.tied:
            used = d[..., self.used]  # (K, N, U)
            self.head_used = (onehot[:, None, :, None] * used[None]).reshape(groups * k, *used.shape[1:])

    def consume_embedding(self, grad: torch.Tensor) -> None:
        """grad: (K, N_e, D). Rows of the embedding gradient are the output gradients summed per token and group."""
        k, groups = grad.shape[0], self.state.groups
        d = self.state.gather(_float(grad.reshape(k, -1, grad.shape[-1])), 1)
        _, inverse = torch.unique(self.state.gather(self.token_ids, 0), return_inverse=True)
        used = int(inverse.max()) + 1
        slot = inverse
        if groups > 1:
            slot = self.state.gather(self.token_owner, 0).to(inverse.device) * used + inverse
        rows = d.new_zeros(k, groups * used, d.shape[-1]).index_add_(1, slot, d)
        rows = rows.reshape(k, groups, used, -1).transpose(0, 1).reshape(groups * k, used, -1)
        self.state.add(torch.einsum("kud,lud->kl", rows, rows))
        if self.tied and self.head_used is not None:
            # <D_h,i^T X, E_j> summed over used rows u: sum_{t,u} D_h,i[t,u] (x_t . E_j[u]).
            cross = torch.einsum(
                "ktu,lut->kl", self.head_used, torch.matmul(rows, self.head_inputs.to(d.dtype).T)
            )
            self.state.add(cross + cross.T)
        self.head_used = None
