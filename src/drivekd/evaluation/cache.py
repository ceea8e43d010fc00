"""A disk cache of judge replies (SQLite), so a rerun of the same grading costs nothing.

The key is (judge model, prompt hash, run index): the prompt hash covers the chat messages and the sampling
settings, and the run index keeps the N grading runs of one prompt apart. Only replies are stored (never the API
key); a failed call is not cached, so a rerun tries it again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    judge_model TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    run INTEGER NOT NULL,
    status TEXT NOT NULL,
    reply TEXT NOT NULL,
    score REAL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (judge_model, prompt_hash, run)
)
"""


def prompt_hash(messages: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """SHA-256 of the messages and the sampling settings (temperature, token limit) as canonical JSON."""
    blob = json.dumps({"messages": messages, "settings": settings}, sort_keys=True, ensure_ascii=False)
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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get(self, judge_model: str, digest: str, run: int) -> CachedReply | None:
        row = self._db.execute(
            "SELECT status, reply, score, prompt_tokens, completion_tokens, calls FROM replies "
            "WHERE judge_model = ? AND prompt_hash = ? AND run = ?",
            (judge_model, digest, run),
        ).fetchone()
        return CachedReply(*row) if row else None

    def put(self, judge_model: str, digest: str, run: int, entry: CachedReply) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                judge_model,
                digest,
                run,
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

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        self._db.close()
