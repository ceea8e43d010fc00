"""The pre-study set: samples read from JSONL, grouped by image, with validated paraphrase groups.

Image identity is (scene_id, frame_id, the sorted (camera, path) pairs), so the single-view and six-camera
renderings of one synthetic scene are different images. Paraphrases (appendix A.3) follow one convention:
a reworded question carries ``meta["paraphrase_of"] = <id of the original question>``; the original carries
nothing, must be on the same image and must not itself be a paraphrase. A question and its rewordings form a
paraphrase group named by the original's id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drivekd.data.header import image_root_for
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DataError

ImageKey = tuple[str, str, tuple[tuple[str, str], ...]]
PARAPHRASE_KEY = "paraphrase_of"
PARAPHRASE_HINT = 'set meta["paraphrase_of"] to the id of the original question, on the same image'


def image_key(sample: Sample) -> ImageKey:
    """Which image (or camera set) a sample asks about."""
    return sample.scene_id, sample.frame_id, tuple(sorted((im.camera, im.path) for im in sample.images))


@dataclass(frozen=True)
class PrestudySet:
    """Samples to analyse (at most ``max_samples``, in file order), their image root and paraphrase groups."""

    file: str
    image_root: Path
    samples: list[Sample]
    groups: dict[str, str]  # sample id -> paraphrase group, for samples in a group
    domain: str  # confidence domain of samples whose meta has no "domain"

    def domain_of(self, sample: Sample) -> str:
        return str(sample.meta.get("domain", self.domain))

    def by_image(self) -> Iterator[tuple[ImageKey, list[Sample]]]:
        """The samples grouped by image, images in order of first appearance."""
        groups: dict[ImageKey, list[Sample]] = {}
        for sample in self.samples:
            groups.setdefault(image_key(sample), []).append(sample)
        yield from groups.items()


def load_prestudy(
    path: str | Path,
    *,
    image_root: Path | None = None,
    max_samples: int | None = None,
    domain: str = "driving",
) -> PrestudySet:
    """Read and validate a JSONL file (every row, so paraphrase references are checked file-wide)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found", hint="pass an existing Drive-KD JSONL file")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    root = image_root_for(path, image_root)
    rows: list[Sample] = []
    seen: set[str] = set()
    for sample in read_jsonl(path, image_root=root):
        if sample.id in seen:
            raise DataError(
                str(path), f"id {sample.id!r}", "id", "duplicate sample id", hint="make ids unique"
            )
        seen.add(sample.id)
        rows.append(sample)
    if not rows:
        raise DataError(
            str(path), None, None, "no samples", hint="pass a JSONL file with at least one sample"
        )
    groups = _paraphrase_groups(str(path), rows)
    kept = rows[:max_samples]
    kept_ids = {s.id for s in kept}
    return PrestudySet(str(path), root, kept, {k: v for k, v in groups.items() if k in kept_ids}, domain)


def _paraphrase_groups(file: str, rows: list[Sample]) -> dict[str, str]:
    by_id = {s.id: s for s in rows}
    groups: dict[str, str] = {}
    for sample in rows:
        if PARAPHRASE_KEY not in sample.meta:
            continue
        where = (file, f"id {sample.id!r}", f"meta.{PARAPHRASE_KEY}")
        original = sample.meta[PARAPHRASE_KEY]
        if not isinstance(original, str) or original not in by_id:
            raise DataError(
                *where, f"{original!r} is not the id of a sample in this file", hint=PARAPHRASE_HINT
            )
        if original == sample.id:
            raise DataError(*where, "a question cannot be a paraphrase of itself", hint=PARAPHRASE_HINT)
        if PARAPHRASE_KEY in by_id[original].meta:
            raise DataError(
                *where,
                f"{original!r} is itself a paraphrase; name the original question",
                hint=PARAPHRASE_HINT,
            )
        if image_key(by_id[original]) != image_key(sample):
            raise DataError(*where, f"{original!r} asks about a different image", hint=PARAPHRASE_HINT)
        groups[sample.id] = groups[original] = original
    return groups
