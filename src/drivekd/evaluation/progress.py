"""A progress bar on stderr with counts, a rate and time left (generation and judging share it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Advance(Protocol):
    def __call__(self, steps: int = 1, *, rate: str = "") -> None: ...


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True) -> Iterator[Advance]:
    """Yield ``advance(steps, rate=...)``; ``rate`` is a short text such as "12.3 tok/s" shown beside the bar."""
    if not enabled:
        yield lambda steps=1, *, rate="": None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(steps: int = 1, *, rate: str = "") -> None:
            bar.update(task, advance=steps, rate=rate)

        yield advance
