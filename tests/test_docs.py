"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example writes under runs/
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    for name in ("ce", "perception", "reasoning", "planning"):
        assert f"'{name}':" in printed


ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _resolve(path: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ModuleNotFoundError(path)


def test_every_equation_map_entry_names_a_real_object():
    """Each backticked name in the equation map resolves: a dotted path, or a bare name of the module (or class)
    named last before it."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Equation map") :]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "drivekd." in line]
    assert len(rows) >= 24  # every equation group of the paper
    resolved = 0
    for row in rows:
        module = None
        for token in re.findall(r"`([^`]+)`", row.split("|")[3]):
            if (
                not re.fullmatch(r"[A-Za-z_][\w.]*", token)
                or token.startswith("distill.")
                or token.startswith("layers.")
            ):
                continue  # config keys and argument values
            if token.startswith("drivekd."):
                target = _resolve(token)
                # a later bare name lives in this module or class, or beside this function
                module = token if isinstance(target, type(os) | type) else token.rsplit(".", 1)[0]
            else:
                assert module is not None, f"{token!r} in {row!r} has no module before it"
                try:
                    _resolve(f"{module}.{token}")
                except AttributeError:  # a sibling of the class named last
                    _resolve(f"{module.rsplit('.', 1)[0]}.{token}")
            resolved += 1
    assert resolved >= 60
