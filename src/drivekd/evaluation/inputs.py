"""Evaluation input: a DriveBench QA file (JSON list) or Drive-KD JSONL, read into :class:`Sample` rows."""

from __future__ import annotations

from pathlib import Path

from drivekd.data.drivebench import import_drivebench
from drivekd.data.header import image_root_for
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DataError


def is_drivebench_file(path: str | Path) -> bool:
    """DriveBench files are JSON lists (``.json``); everything else is read as Drive-KD JSONL."""
    return Path(path).suffix.lower() == ".json"


def load_samples(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    check_files: bool = True,
    text_only: bool = False,
    visual_descriptions: str | Path | None = None,
) -> tuple[list[Sample], Path]:
    """The samples of ``path`` and the folder their image paths are relative to.

    A DriveBench file is read by the data side's importer (:func:`~drivekd.data.drivebench.import_drivebench`),
    with ``text_only`` and ``visual_descriptions`` meaning what they mean to ``drivekd data import-drivebench``:
    without ``text_only`` it needs ``image_root`` (the root of a DriveBench checkout, which holds the rows'
    ``data/nuscenes/...`` paths) and checks the images; with it no image is needed, checked or shown. For JSONL
    the root defaults to the one the file records, else its folder (:func:`~drivekd.data.header.image_root_for`),
    ``check_files=False`` skips the image check (scoring needs no
    images) and ``text_only`` marks every sample text-only (asked without images); visual descriptions are
    attached at import (``drivekd data import-drivebench --visual-descriptions``). Ids must be unique, since
    predictions are matched by id.
    """
    path = Path(path)
    if is_drivebench_file(path):
        if image_root is None and not text_only:
            raise DataError(
                str(path),
                None,
                None,
                "a DriveBench file needs the image root",
                hint="pass --image-root (the root of a DriveBench checkout, holding data/nuscenes/), "
                "or --text-only to read the rows without images",
            )
        imported = import_drivebench(
            path, image_root, text_only=text_only, visual_descriptions=visual_descriptions
        )
        samples = imported.samples
        root = image_root_for(
            path, image_root
        )  # a DriveBench file has no header: the given root, or its folder
    else:
        if visual_descriptions is not None:
            raise DataError(
                str(path),
                None,
                None,
                "visual descriptions are attached when a DriveBench file is read, not to JSONL",
                hint="pass the DriveBench .json file itself, or import it with drivekd data import-drivebench "
                "--visual-descriptions",
            )
        check_files = check_files and not text_only
        root = image_root_for(path, image_root, check=check_files)
        rows = read_jsonl(path, image_root=root, check_files=check_files)
        samples = [s.model_copy(update={"text_only": True}) if text_only else s for s in rows]
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
