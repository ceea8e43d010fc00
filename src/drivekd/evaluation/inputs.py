"""Evaluation input: a DriveBench QA file (JSON list) or Drive-KD JSONL, read into :class:`Sample` rows."""

from __future__ import annotations

from pathlib import Path

from drivekd.data.drivebench import import_drivebench
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DataError


def is_drivebench_file(path: str | Path) -> bool:
    """DriveBench files are JSON lists (``.json``); everything else is read as Drive-KD JSONL."""
    return Path(path).suffix.lower() == ".json"


def load_samples(
    path: str | Path, *, image_root: str | Path | None = None, check_files: bool = True
) -> tuple[list[Sample], Path]:
    """The samples of ``path`` and the folder their image paths are relative to.

    A DriveBench file needs ``image_root`` (the root of a DriveBench checkout, which holds the rows'
    ``data/nuscenes/...`` paths); its importer always checks the images. For JSONL the root defaults to the file's folder and ``check_files=False`` skips the image check
    (scoring needs no images). Ids must be unique, since predictions are matched by id.
    """
    path = Path(path)
    if is_drivebench_file(path):
        if image_root is None:
            raise DataError(
                str(path),
                None,
                None,
                "a DriveBench file needs the image root",
                hint="pass --image-root (the root of a DriveBench checkout, holding data/nuscenes/)",
            )
        samples = import_drivebench(path, image_root).samples
        root = Path(image_root)
    else:
        root = Path(image_root) if image_root is not None else path.parent
        samples = list(read_jsonl(path, image_root=root, check_files=check_files))
    seen: set[str] = set()
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise DataError(
                str(path),
                index if is_drivebench_file(path) else index + 1,
                "id",
                f"sample id {sample.id!r} is repeated",
                hint="give every sample its own id",
            )
        seen.add(sample.id)
    return samples, root
