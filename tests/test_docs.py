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
