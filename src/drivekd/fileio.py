"""Whole-file writes: a file is written beside its destination and renamed into place, so a reader (or a crash)
never sees half of it and an existing file is only ever replaced by a complete one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from drivekd.errors import OutputExistsError


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path`` (removed if interrupted)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def refuse_overwrite(
    out: Path, *, overwrite: bool, inputs: Iterable[Path] = (), option: str = "--out"
) -> None:
    """Raise :class:`OutputExistsError` when writing ``out`` would replace one of ``inputs`` or an existing file,
    unless ``overwrite``; so nothing is replaced by a command that was not told to. ``option`` names the flag."""
    if overwrite:
        return
    for source in inputs:
        if source.exists() and out.exists() and out.samefile(source):
            raise OutputExistsError(
                f"{option} {out} is the input file {source}: writing it would replace the input; choose another "
                f"{option} (or pass --overwrite to replace it)"
            )
    if out.exists():
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it or choose another {option}")
