"""A disk cache of judge replies (SQLite), so a rerun of the same grading costs nothing.

A grading is keyed by (prompt hash, run index): the prompt hash covers the graded item's id, the chat messages and
every setting that shapes a grade (judge protocol, endpoint, judge model, temperature, token limit), and the run
index keeps the N grading runs of one prompt apart. The id keeps two questions whose prompts happen to be equal
(the DriveLM GPT prompt holds only the two answers) graded separately, as the upstream evaluators grade them. Each row also stores the hash of the messages alone and the settings in clear,
so a cache that holds grades of the same prompts made under other settings is refused with the differences
named, instead of silently mixing two judges' grades in one file. Only replies are stored (never the API key); a
failed call is not cached, so a rerun tries it again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivekd.errors import DriveKDError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grades (
    prompt_hash TEXT NOT NULL,
    run INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    settings TEXT NOT NULL,
    status TEXT NOT NULL,
    reply TEXT NOT NULL,
    score REAL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (prompt_hash, run)
);
CREATE INDEX IF NOT EXISTS grades_content ON grades (content_hash);
"""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def content_hash(messages: list[dict[str, Any]]) -> str:
    """SHA-256 of the chat messages alone (canonical JSON)."""
    return hashlib.sha256(_canonical(messages).encode("utf-8")).hexdigest()


def prompt_hash(messages: list[dict[str, Any]], settings: dict[str, Any], item: str) -> str:
    """SHA-256 of the item id, the messages and the grading settings (protocol, endpoint, model, temperature,
    token limit)."""
    blob = _canonical({"item": item, "messages": messages, "settings": settings})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    """A stored grading: ``status`` is "ok" or "unparsed"; tokens and calls are what it cost when it was made."""

    status: str
    reply: str
    score: float | None
    prompt_tokens: int
    completion_tokens: int
    calls: int


class JudgeCache:
    """SQLite-backed store of :class:`CachedReply` rows; each write is committed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "replies" in tables:
            self._db.close()
            raise DriveKDError(
                f"{self.path}: a judge cache from an older Drive-KD, whose grades do not record the judge "
                "settings they were made with; pass a new --cache file (this one is left as it is)"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def get(self, digest: str, run: int) -> CachedReply | None:
        row = self._db.execute(
            "SELECT status, reply, score, prompt_tokens, completion_tokens, calls FROM grades "
            "WHERE prompt_hash = ? AND run = ?",
            (digest, run),
        ).fetchone()
        return CachedReply(*row) if row else None

    def put(
        self, digest: str, run: int, entry: CachedReply, *, content: str, settings: dict[str, Any]
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO grades VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest,
                run,
                content,
                _canonical(settings),
                entry.status,
                entry.reply,
                entry.score,
                entry.prompt_tokens,
                entry.completion_tokens,
                entry.calls,
                time.time(),
            ),
        )
        self._db.commit()

    def refuse_mixing(self, contents: Sequence[str], settings: dict[str, Any]) -> None:
        """Raise when grades of any of these prompts (by content hash) were made under other settings."""
        mine = _canonical(settings)
        unique = sorted(set(contents))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            row = self._db.execute(
                f"SELECT settings, COUNT(DISTINCT content_hash) FROM grades WHERE content_hash IN ({marks}) "
                "AND settings != ? GROUP BY settings LIMIT 1",
                (*chunk, mine),
            ).fetchone()
            if row is None:
                continue
            other = json.loads(row[0])
            diff = ", ".join(
                f"{key} {other.get(key)!r} there vs {settings.get(key)!r} now"
                for key in sorted(set(other) | set(settings))
                if other.get(key) != settings.get(key)
            )
            raise DriveKDError(
                f"{self.path}: holds grades of {row[1]} of these prompts made under other judge settings "
                f"({diff}); grades made under different settings are not mixed: pass another --cache file, "
                "or delete this one"
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM grades").fetchone()[0])

    def close(self) -> None:
        self._db.close()
