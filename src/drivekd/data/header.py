"""The header line of a Drive-KD JSONL file: the image root the file was made with, and which root a reader uses.

An import writes ``{"drivekd_header": {"image_root": ROOT}}`` as the file's first line, ROOT being the folder its
image paths are relative to: relative to the JSONL's folder when inside it (so the folder can be moved), absolute
otherwise. Every later command then finds the images without ``--image-root``; the image paths themselves stay
relative to that root, so the confinement of :mod:`drivekd.data.images` holds against it. A file without a header
(synthetic data, whose images lie under the JSONL's folder, and files written before headers) reads as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivekd.errors import DataError

HEADER_KEY = "drivekd_header"
ROOT_FIELD = f"{HEADER_KEY}.image_root"
ROOT_HINT = (
    "pass --image-root (data.image_root in a training config) with the folder the images are under, or "
    "re-import the file"
)


def is_header(row: Any) -> bool:
    """Whether a parsed JSONL line is a header rather than a sample."""
    return isinstance(row, dict) and HEADER_KEY in row


def header_line(image_root: Path, path: Path) -> str:
    """The header line (with its newline) recording ``image_root`` for the JSONL file at ``path``."""
    root, folder = image_root.resolve(), path.parent.resolve()
    recorded = root.relative_to(folder).as_posix() if root.is_relative_to(folder) else str(root)
    return json.dumps({HEADER_KEY: {"image_root": recorded}}) + "\n"


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of ``path`` (its first line), or ``None`` when it has none or cannot be read (its reader then
    says why); a header that is not a JSON object is a :class:`DataError` naming it."""
    try:
        with path.open("rb") as handle:
            first = handle.readline()
        row = json.loads(first)
    except (OSError, ValueError):
        return None
    if not is_header(row):
        return None
    header = row[HEADER_KEY]
    if not isinstance(header, dict):
        message = f"must be a JSON object, got {type(header).__name__}"
        raise DataError(str(path), 1, HEADER_KEY, message, hint=ROOT_HINT)
    return header


def image_root_for(path: str | Path, given: str | Path | None = None, *, check: bool = True) -> Path:
    """The folder the image paths of JSONL ``path`` are relative to: ``given`` (``--image-root``,
    ``data.image_root``) when set, else the root its header records, else the file's folder.

    A recorded root that is not a string, or (with ``check``; off where no image is read, as in scoring) not an
    existing folder, is a :class:`DataError` naming the file and the ``drivekd_header.image_root`` field.
    """
    path = Path(path)
    if given is not None and str(given) != "":
        return Path(given)
    header = read_header(path)
    if header is None or "image_root" not in header:
        return path.parent
    recorded = header["image_root"]
    if not isinstance(recorded, str) or not recorded:
        raise DataError(str(path), 1, ROOT_FIELD, f"must be a folder path, got {recorded!r}", hint=ROOT_HINT)
    root = path.parent / recorded  # an absolute recorded root stays as it is
    if check and not root.is_dir():
        message = f"the recorded image root {recorded!r} is not a folder ({root})"
        raise DataError(str(path), 1, ROOT_FIELD, message, hint=ROOT_HINT)
    return root
