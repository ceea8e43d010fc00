"""The command line's first impressions (issue 14, items 5 and 8): a fast ``--help`` that imports no torch,
``--version``, CUDA as the default device, and ``train --print-config``."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
import yaml
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.training.config import load_config

runner = CliRunner()
HEAVY = ("torch", "transformers", "peft", "accelerate", "matplotlib", "scipy")
LIST_HELP = f"""
import sys
from drivekd.cli import app
try:
    app(["--help"], prog_name="drivekd")
except SystemExit as done:
    assert done.code == 0, done.code
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""


def test_help_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", LIST_HELP], capture_output=True, text=True, timeout=120, check=True
    )
    assert "cache-teacher" in proc.stdout and "analyze" in proc.stdout  # every command is listed
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "command", [["analyze"], ["cache-teacher"], ["eval", "generate"], ["bench", "inference"], ["train"]]
)
def test_command_help_still_shows_its_options(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--" in result.output and "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"drivekd {version('drivekd')}"


def test_commands_default_to_cuda_when_there_is_one(monkeypatch, tmp_path):
    """With a CUDA device reported but none usable, a command that defaults to CUDA names it in its error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    args = ["eval", "generate", str(data), "--model", "tiny:qwen2_5_vl", "--out", str(tmp_path / "p.jsonl")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--device cuda: 0 CUDA devices are visible" in result.output


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"optim": {"lr": 3e-4}, "run": {"output_dir": str(out)}}))
    result = runner.invoke(app, ["train", str(config), "distill.recipe=sft", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["optim"]["lr"] == 3e-4 and printed["distill"]["recipe"] == "sft"
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.output)
    assert load_config(resolved) == load_config(config, ["distill.recipe=sft"])  # every key, loadable as is
    assert not out.exists()


def test_print_config_names_a_bad_key(tmp_path):
    result = runner.invoke(app, ["train", "optim.lrr=1", "--print-config"])
    assert result.exit_code == 2 and "optim.lrr" in result.output and "optim.lr" in result.output
