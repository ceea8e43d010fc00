"""Layer-wise pre-study metrics of section 3.2: eqs. 1-5 and the signal dispersion of section 3.2.2.

Pure functions compute one batch's values; each accumulator folds batches into float64 sums (``update``) and
reports the data-set value (``result``), so the hidden states of the data set are never held at once. Layers use
the paper's numbering: entry l of a hidden-state sequence is layer l, the embeddings are layer 0.

Cosines are taken between L2-normalised vectors in at least float32 (no overflow from large activations); a zero
vector has cosine 0 with everything.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from drivekd.losses.attention import at_least_float32

DISPERSION_KINDS = ("question", "rewording")
ALL = "all"  # the all-capabilities aggregate


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit L2 norm over the last dimension in at least float32 (0 stays 0).

    Dividing by the largest magnitude first keeps the norm from overflowing for huge activations.
    """
    x = at_least_float32(x)
    scale = x.abs().amax(-1, keepdim=True)
    return F.normalize(x / torch.where(scale > 0, scale, torch.ones_like(scale)), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension, in at least float32."""
    return (unit(a) * unit(b)).sum(-1)


def adjacent_token_cosines(hidden_states: Sequence[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """(N, T) cosines between layers l and l + 1 (l = 0..N-1) at each of the T non-padding tokens (eq. 1).

    ``hidden_states`` holds N + 1 tensors (B, L, D): the embeddings, then the output of every decoder layer.
    """
    valid = valid.bool()
    return torch.stack(
        [cosine(lower[valid], upper[valid]) for lower, upper in itertools.pairwise(hidden_states)]
    )


def segment_means(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D) mean of ``hidden`` (B, L, D) over the True positions of ``mask`` (B, L) (eq. 2); 0 for none."""
    weights = mask.to(torch.promote_types(hidden.dtype, torch.float32))
    total = torch.einsum("bl,bld->bd", weights, at_least_float32(hidden))
    return total / weights.sum(1, keepdim=True).clamp(min=1)


def vision_text_cosines(
    hidden_states: Sequence[torch.Tensor], vision: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """(N + 1, B') cosine of the mean-pooled vision and text segments per layer (eqs. 2-3).

    Only the B' samples that have both vision and text tokens enter.
    """
    keep = vision.any(1) & text.any(1)
    vision, text = vision[keep], text[keep]
    return torch.stack(
        [cosine(segment_means(h[keep], vision), segment_means(h[keep], text)) for h in hidden_states]
    )


def mean_pairwise_cosine(centres: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all unordered pairs of the G centres (eq. 5): (G, ..., D) -> (...); needs G >= 2.

    The sum over pairs i < j of u_i . u_j (u the unit vectors, see :func:`unit`) is
    (||sum u||^2 - sum ||u||^2) / 2, which costs O(G D) instead of O(G^2 D); it is evaluated in float64.
    """
    units = unit(centres.double())
    return _pair_mean(units.sum(0), units.square().sum(-1).sum(0), units.shape[0])


def _pair_mean(unit_sum: torch.Tensor, unit_square_sum: torch.Tensor, count: int) -> torch.Tensor:
    if count < 2:
        raise ValueError(f"a mean pairwise cosine needs at least 2 vectors, got {count}")
    return (unit_sum.square().sum(-1) - unit_square_sum) / (count * (count - 1))


def hidden_dispersion(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1 - cos of two questions' hidden vectors, per layer: (N, D), (N, D) -> (N,) (section 3.2.2)."""
    return 1 - cosine(u, v)


def attention_dispersion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos of two questions' head-mean maps, per layer: (N, La, La), (N, Lb, Lb) -> (N,) (section 3.2.2).

    The maps are compared on their overlap-aligned top-left m x m submatrices, m = min(La, Lb), flattened.
    """
    m = min(a.shape[-1], b.shape[-1])
    a, b = at_least_float32(a[:, :m, :m]).flatten(1), at_least_float32(b[:, :m, :m]).flatten(1)
    # Attention probabilities are in [0, 1], so the plain dot product cannot overflow: three passes over the maps
    # instead of the rescaling of :func:`unit`, for the largest tensors of the analysis.
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    dots = torch.linalg.vecdot(a, b, dim=-1)
    return 1 - torch.where(norms > 0, dots / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0)


class _LayerMean:
    """float64 running sums of per-layer values and how many values entered."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """Add (layers, n) values."""
        total = values.detach().double().sum(1).cpu()
        self.total = total if self.total is None else self.total + total
        self.count += values.shape[1]

    def result(self) -> list[float] | None:
        if self.total is None or self.count == 0:
            return None
        return (self.total / self.count).tolist()


class AdjacentCosine:
    """S^(l), l = 0..N-1 (eq. 1): the mean over every non-padding token of every sample."""

    def __init__(self) -> None:
        self._mean = _LayerMean()

    @property
    def tokens(self) -> int:
        return self._mean.count

    def update(self, hidden_states: Sequence[torch.Tensor], valid: torch.Tensor) -> None:
        self._mean.add(adjacent_token_cosines(hidden_states, valid))

    def result(self) -> list[float] | None:
        return self._mean.result()


class VisionTextCosine:
    """C^(l), l = 0..N (eqs. 2-3): the mean over samples of the vision-text segment cosine."""

    def __init__(self) -> None:
        self._mean = _LayerMean()

    @property
    def samples(self) -> int:
        return self._mean.count

    def update(self, hidden_states: Sequence[torch.Tensor], vision: torch.Tensor, text: torch.Tensor) -> None:
        self._mean.add(vision_text_cosines(hidden_states, vision.bool(), text.bool()))

    def result(self) -> list[float] | None:
        return self._mean.result()


@dataclass
class _FoldSums:
    """Sums over unit centres split into K folds (image i, in closing order, goes to fold i mod K).

    Per fold: the sum of unit centres (K, layers, D), the sum of their squared norms (K, layers; 1, or 0 for a
    zero centre) and the count. The folds together give eq. 5 exactly; apart, they give a standard error.
    """

    unit_sum: torch.Tensor
    unit_square_sum: torch.Tensor
    counts: list[int]

    @classmethod
    def zeros(cls, like: torch.Tensor, folds: int) -> _FoldSums:
        return cls(
            torch.zeros(folds, *like.shape, dtype=torch.float64),
            torch.zeros(folds, like.shape[0], dtype=torch.float64),
            [0] * folds,
        )

    def copy(self) -> _FoldSums:
        return _FoldSums(self.unit_sum.clone(), self.unit_square_sum.clone(), list(self.counts))

    def add(self, centre: torch.Tensor) -> None:
        fold = sum(self.counts) % len(self.counts)
        vector = unit(centre)
        self.unit_sum[fold] += vector
        self.unit_square_sum[fold] += vector.square().sum(-1)
        self.counts[fold] += 1

    def mean(self) -> torch.Tensor | None:
        count = sum(self.counts)
        return _pair_mean(self.unit_sum.sum(0), self.unit_square_sum.sum(0), count) if count >= 2 else None

    def stderr(self) -> torch.Tensor | None:
        """Approximate standard error of :meth:`mean`: the spread of the folds' own estimates over sqrt(K).

        Eq. 5 is a U-statistic, whose variance falls as 1 / G, so a fold of G / K images varies K times as much
        as the whole. Folds with fewer than 2 images are left out; None with fewer than 2 usable folds.
        """
        folds = [k for k, count in enumerate(self.counts) if count >= 2]
        if len(folds) < 2:
            return None
        estimates = torch.stack(
            [_pair_mean(self.unit_sum[k], self.unit_square_sum[k], self.counts[k]) for k in folds]
        )
        return (estimates.var(0) / len(folds)).sqrt()


class IntraConsistency:
    """intra_c^(l) (eqs. 4-5): per capability, the mean pairwise cosine of the per-image centres.

    ``update`` adds the last-non-special-token vectors (B, layers, D) of a batch to running sums per (image,
    capability) (eq. 4). :meth:`close` folds an image's finished centres into per-capability sums of unit vectors,
    from which eq. 5 follows exactly (see :func:`mean_pairwise_cosine`), so memory is O(open images x layers x D).
    A closed image cannot receive more questions. The unit sums are kept in ``folds`` disjoint image folds, which
    also give an approximate standard error (:meth:`standard_errors`).
    """

    def __init__(self, folds: int = 4) -> None:
        if folds < 1:
            raise ValueError(f"folds must be at least 1, got {folds}")
        self.folds = folds
        self._open: dict[tuple[Hashable, str], list] = {}
        self._closed: set[Hashable] = set()
        self._units: dict[str, _FoldSums] = {}

    def update(self, vectors: torch.Tensor, images: Sequence[Hashable], capabilities: Sequence[str]) -> None:
        if not len(images) == len(capabilities) == vectors.shape[0]:
            raise ValueError(
                f"need one image and capability per vector row, got {vectors.shape[0]} rows, {len(images)} "
                f"images and {len(capabilities)} capabilities"
            )
        vectors = vectors.detach().double().cpu()
        for row, image, capability in zip(vectors, images, capabilities, strict=True):
            if image in self._closed:
                raise ValueError(f"image {image!r} was closed; all its questions must come before close()")
            entry = self._open.setdefault((image, capability), [torch.zeros_like(row), 0])
            entry[0] += row
            entry[1] += 1

    def close(self, image: Hashable) -> None:
        """Fold ``image``'s centres into the capability sums (call once all its questions were added)."""
        for key in [k for k in self._open if k[0] == image]:
            total, count = self._open.pop(key)
            self._fold_into(self._units, key[1], total / count)
        self._closed.add(image)

    def images(self) -> dict[str, int]:
        """How many images (closed or open) have a centre for each capability."""
        return {capability: sum(sums.counts) for capability, sums in self._all().items()}

    def result(self) -> dict[str, list[float] | None]:
        """Per capability, intra^(l) for every layer; None for a capability seen on fewer than 2 images."""
        return {c: _listed(sums.mean()) for c, sums in sorted(self._all().items())}

    def standard_errors(self) -> dict[str, list[float] | None]:
        """Per capability, the approximate standard error of intra^(l) (None with too few images)."""
        return {c: _listed(sums.stderr()) for c, sums in sorted(self._all().items())}

    def _all(self) -> dict[str, _FoldSums]:
        """The capability sums with the still-open images folded in (without closing them)."""
        sums = {c: s.copy() for c, s in self._units.items()}
        for (_, capability), (total, count) in self._open.items():
            self._fold_into(sums, capability, total / count)
        return sums

    def _fold_into(self, sums: dict[str, _FoldSums], capability: str, centre: torch.Tensor) -> None:
        if capability not in sums:
            sums[capability] = _FoldSums.zeros(centre, self.folds)
        sums[capability].add(centre)


def _listed(values: torch.Tensor | None) -> list[float] | None:
    return None if values is None else values.tolist()


@dataclass
class _Question:
    capability: str
    group: str | None
    hidden: torch.Tensor  # (N, D)
    maps: torch.Tensor  # (N, L, L), L the question's own (unpadded) length


@dataclass
class _ImageMeans:
    """Per (signal, kind, scope): sum over images of the image's mean pair dispersion, and the image count."""

    totals: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    images: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def add(self, key: tuple[str, str, str], image_mean: torch.Tensor) -> None:
        self.totals[key] = self.totals.get(key, 0) + image_mean
        self.images[key] = self.images.get(key, 0) + 1


class Dispersion:
    """Hidden-state vs attention dispersion across questions of the same image (section 3.2.2, appendix A.3).

    Each question brings its hidden vector at every layer (N, D) and its head-mean maps (N, L, L); they are held
    only until :meth:`close` of their image. There, every unordered pair of the image's questions gives
    1 - cos per layer for both signals: pairs from the same paraphrase group are "rewording" pairs (appendix
    A.3), all other pairs are "question" pairs. Pairs are averaged per image, then over images, per capability
    (pairs within one capability) and for all capabilities together ("all": every pair of the image).
    ``max_questions`` bounds how many questions of one image are held (the rest are counted and left out).
    """

    def __init__(self, max_questions: int | None = None) -> None:
        if max_questions is not None and max_questions < 2:
            raise ValueError(f"max_questions must be at least 2 (pairs are needed), got {max_questions}")
        self.max_questions = max_questions
        self._held: dict[Hashable, list[_Question]] = {}
        self._closed: set[Hashable] = set()
        self._means = _ImageMeans()
        self.pairs = {kind: 0 for kind in DISPERSION_KINDS}
        self.skipped = 0
        self._capabilities: set[str] = set()

    def add(
        self,
        image: Hashable,
        capability: str,
        group: str | None,
        hidden: torch.Tensor,
        maps: torch.Tensor,
    ) -> None:
        if image in self._closed:
            raise ValueError(f"image {image!r} was closed; all its questions must come before close()")
        if hidden.dim() != 2 or maps.dim() != 3 or maps.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"need hidden (N, D) and maps (N, L, L) with the same N, got {tuple(hidden.shape)} and "
                f"{tuple(maps.shape)}"
            )
        self._capabilities.add(capability)
        held = self._held.setdefault(image, [])
        if self.max_questions is not None and len(held) >= self.max_questions:
            self.skipped += 1
            return
        held.append(_Question(capability, group, hidden.detach(), maps.detach()))

    def close(self, image: Hashable) -> None:
        """Score every pair of ``image``'s questions and release their tensors."""
        questions = self._held.pop(image, [])
        self._closed.add(image)
        sums: dict[tuple[str, str, str], list] = {}
        for a, b in itertools.combinations(questions, 2):
            kind = "rewording" if a.group is not None and a.group == b.group else "question"
            self.pairs[kind] += 1
            values = {
                "hidden": hidden_dispersion(a.hidden, b.hidden).double().cpu(),
                "attention": attention_dispersion(a.maps, b.maps).double().cpu(),
            }
            scopes = (ALL, a.capability) if a.capability == b.capability else (ALL,)
            for signal, value in values.items():
                for scope in scopes:
                    entry = sums.setdefault((signal, kind, scope), [0, 0])
                    entry[0] = entry[0] + value
                    entry[1] += 1
        for key, (total, count) in sums.items():
            self._means.add(key, total / count)

    def result(self) -> dict:
        """``{signal: {kind: {scope: [per layer] | None} | None}}`` plus image counts; closes open images.

        Scopes are the capabilities seen and "all". A kind is None when the data has no pair of it ("rewording"
        without paraphrase groups); a scope is None when no image has a pair in it.
        """
        for image in list(self._held):
            self.close(image)
        scopes = [*sorted(self._capabilities), ALL]
        out: dict = {"images": {}}
        for signal in ("hidden", "attention"):
            out[signal] = {}
            for kind in DISPERSION_KINDS:
                if self.pairs[kind] == 0:
                    out[signal][kind] = None
                    continue
                out[signal][kind] = {
                    scope: (
                        (self._means.totals[key] / self._means.images[key]).tolist()
                        if (key := (signal, kind, scope)) in self._means.totals
                        else None
                    )
                    for scope in scopes
                }
        for kind in DISPERSION_KINDS:
            out["images"][kind] = {
                scope: self._means.images.get(("hidden", kind, scope), 0) for scope in scopes
            }
        out["pairs"] = dict(self.pairs)
        out["questions_skipped"] = self.skipped
        return out
