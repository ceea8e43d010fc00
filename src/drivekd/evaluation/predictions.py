"""Prediction records: one JSON object per line, appended as they are produced so a crashed run can resume.

A record is ``{"id", "prediction", "model", "new_tokens", "seconds"}``. :class:`PredictionWriter` opens a file for
appending, skipping ids already present; a last line cut off by a crash (no trailing newline, not a complete
record) is moved to ``<file>.truncated`` and removed from the file, so the sample is generated again and nothing
that was written is lost.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivekd.errors import DataError

log = logging.getLogger(__name__)


class PredictionRecord(BaseModel):
    """One model answer. ``seconds`` is this sample's share of its batch's generation time."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    prediction: str
    model: str
    new_tokens: int = Field(ge=0)
    seconds: float = Field(ge=0)


def _record(line: str, *, file: str, row: int) -> PredictionRecord:
    try:
        data: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            file, row, None, f"not valid JSON: {err.msg}", hint="repair or delete the line"
        ) from None
    try:
        return PredictionRecord.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<row>"
        raise DataError(file, row, field, first["msg"], hint="repair or delete the line") from None


def read_predictions(path: str | Path) -> dict[str, PredictionRecord]:
    """All records of a predictions file by id; a repeated id is an error naming both lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            str(path),
            None,
            None,
            "no such predictions file",
            hint="pass the JSONL written by `drivekd eval generate`",
        )
    records: dict[str, PredictionRecord] = {}
    lines: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for row, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _record(line, file=str(path), row=row)
            if record.id in records:
                raise DataError(
                    str(path),
                    row,
                    "id",
                    f"id {record.id!r} already appears on line {lines[record.id]}",
                    hint="keep one prediction per sample",
                )
            records[record.id] = record
            lines[record.id] = row
    return records


def _repair_tail(path: Path) -> None:
    """Make the file end with a complete line: keep a complete last record, move a partial one aside."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    tail = data[cut:].decode("utf-8", errors="replace")
    try:
        _record(tail, file=str(path), row=data.count(b"\n") + 1)
    except DataError:
        aside = path.with_name(path.name + ".truncated")
        with aside.open("a", encoding="utf-8") as handle:
            handle.write(tail + "\n")
        with path.open("r+b") as handle:
            handle.truncate(cut)
        log.warning("%s: moved an incomplete last line (%d bytes) to %s", path, len(data) - cut, aside)
        return
    with path.open("ab") as handle:
        handle.write(b"\n")


class PredictionWriter:
    """Append records to ``path``, resuming an existing file (see the module docstring).

    ``model`` guards against mixing: a file written for another model is refused.
    """

    def __init__(self, path: str | Path, *, model: str) -> None:
        self.path = Path(path)
        self.model = model
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _repair_tail(self.path)
            existing = read_predictions(self.path)
        else:
            existing = {}
        others = sorted({r.model for r in existing.values()} - {model})
        if others:
            raise DataError(
                str(self.path),
                None,
                "model",
                f"the file holds predictions of {', '.join(others)}, not {model}",
                hint="write to another file, or pass the same model name to resume",
            )
        self.done: set[str] = set(existing)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: PredictionRecord) -> None:
        """Append one record and flush it to disk; a record for an id already written is refused."""
        if record.id in self.done:
            raise ValueError(f"a prediction for {record.id!r} is already in {self.path}")
        self._handle.write(record.model_dump_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.add(record.id)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
