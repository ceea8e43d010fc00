"""What training checks before its first step: that every teacher sees the student's token layout, live or cached.

Attention maps are compared entry by entry, so a teacher must turn each sample into the student's token sequence.
The token fingerprint of a sample (token ids and vision/text positions, :class:`Fingerprint`) as a live teacher's
processor builds it, or as a cache recorded it, must equal the student's, on one sample of each (number of images,
task, kind) group: the layout follows from the processor settings (image size, tiling, chat template), which these
groups exercise. Every training sample must also be in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from drivekd.data.collate import VLMCollator
from drivekd.data.schema import Sample
from drivekd.errors import CacheError, LayoutMismatchError
from drivekd.signals.cache import CachedTeacher, Fingerprint
from drivekd.training.models import Models


def representatives(samples: Sequence[Sample]) -> list[Sample]:
    """The first sample of each (number of images, task, kind) group, in data order."""
    first: dict[tuple[int, str, str], Sample] = {}
    for sample in samples:
        first.setdefault((len(sample.shown_images), sample.task, sample.kind), sample)
    return list(first.values())


def check_layouts(models: Models, samples: Sequence[Sample], collate: VLMCollator) -> None:
    """Raise :class:`LayoutMismatchError` when a teacher tokenises differently from the student (``collate``), and
    :class:`CacheError` when a cache lacks training samples."""
    picked = representatives(samples)
    for teacher, processor in zip(models.teacher_models, models.teacher_processors, strict=True):
        theirs = VLMCollator(
            processor,
            models.family.image_token_id(teacher),
            image_root=collate.image_root,
            allow_outside_root=collate.allow_outside_root,
            answer_order=collate.answer_order,
        )
        for sample in picked:
            diffs = _fingerprint(theirs, sample).differences(_fingerprint(collate, sample))
            if diffs:
                raise LayoutMismatchError(
                    f"teacher and student tokenise sample {sample.id!r} differently ({_worded(diffs, 'teacher')}). "
                    f"{_SAME_LAYOUT}: use the same processor settings (image size, tiling, chat template) for both"
                )
    caches = {id(s): s for s in models.sources.values() if isinstance(s, CachedTeacher)}
    for cache in caches.values():
        _check_cache(cache, samples, picked, collate)


_SAME_LAYOUT = "Attention maps can only be distilled between models with the same token layout"


def _fingerprint(collate: VLMCollator, sample: Sample) -> Fingerprint:
    return Fingerprint.of(collate([sample]), 0)


def _worded(diffs: list[str], side: str) -> str:
    """Fingerprint differences as "<side> vs student" (they are worded as cached vs batch)."""
    return "; ".join(
        d.replace("cached vs", f"for the {side} vs").replace("in the batch", "for the student") for d in diffs
    )


def _check_cache(
    cache: CachedTeacher, samples: Sequence[Sample], picked: Sequence[Sample], collate: VLMCollator
) -> None:
    missing = [s.id for s in samples if s.id not in cache]
    if missing:
        raise CacheError(
            f"{len(missing)} training samples are not in cache {cache.folder} (first: {', '.join(missing[:3])}): "
            "cache the data set you train on with drivekd cache-teacher"
        )
    for sample in picked:
        cached = cache.index.samples[sample.id].fingerprint
        diffs = cached.differences(_fingerprint(collate, sample))
        if diffs:
            raise LayoutMismatchError(
                f"the student tokenises sample {sample.id!r} differently from the teacher that wrote cache "
                f"{cache.folder} ({_worded(diffs, 'cache')}). {_SAME_LAYOUT}: rebuild the cache with the student's "
                "processor settings (image size, tiling, chat template), or train a student that tokenises like the "
                "teacher"
            )
