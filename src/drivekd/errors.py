"""Errors that name where bad input is and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass


class DriveKDError(Exception):
    """Base class of every error this package raises on purpose."""


@dataclass
class DataError(DriveKDError):
    """A row of an input file is unusable.

    ``file`` and ``row`` locate it (the 1-based line of a JSONL file, the 0-based index in a JSON list, or a key path
    in a nested format), ``field`` names the offending field (dotted for nested ones) and ``hint`` says what to do.
    """

    file: str
    row: int | str | None
    field: str | None
    message: str
    hint: str = "fix the row or pass --skip-invalid to report and skip it"

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", row {self.row}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message} ({self.hint})"


class LayoutMismatchError(DriveKDError):
    """Teacher and student tokenise the same sample differently, so attention maps cannot be compared."""


class CaptureError(DriveKDError):
    """Attention capture was used in a way that would silently give wrong maps or gradients."""


class CacheError(DriveKDError):
    """A teacher-signal cache is missing, corrupt, incomplete or does not match the batch it is asked for."""


class ModelSourceError(DriveKDError, ValueError):
    """A model named by a flag or config cannot be loaded: unknown family, missing folder, unreachable hub id."""


class OutputExistsError(DriveKDError):
    """A command would replace an existing file or one of its own inputs without ``--overwrite``."""
