"""Training progress on the console (issue 14, item 4): planned steps at start, a plain line every run.log_every
steps off a terminal with per-term normalised losses, lr, step time and ETA, and nothing from ranks other than 0."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from drivekd.data.synthetic import generate_split
from drivekd.training.config import load_config
from drivekd.training.progress import TrainProgress, duration, planned_steps, step_line, term_losses
from drivekd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
README = ROOT / "README.md"
RECORD = {
    "step": 3,
    "lr": 4.9e-5,
    "loss/ce/perception": 2.0,
    "loss/ce/planning": 4.0,
    "loss/perception/perception": 1e-9,
    "loss/perception/planning": 3e-9,
    "loss": 6.000000004,
    "seconds": 1.5,
}


def test_duration_and_eta_arithmetic():
    assert [duration(s) for s in (0, 41.4, 221, 3600 + 5 * 60 + 20)] == ["0s", "41s", "3m41s", "1h05m"]
    line = step_line(RECORD, 200, 1.234, 197 * 1.5)
    assert line == "step 3/200  ce 3  perception 2e-09  lr 4.90e-05  1.23 s/step  ETA 4m56s"


def test_losses_are_per_term_means_over_capabilities_not_the_sum():
    assert term_losses(RECORD) == {"ce": 3.0, "perception": pytest.approx(2e-9)}


def test_planned_steps_names_its_derivation():
    assert planned_steps(40, max_steps=40, epochs=3, micro_steps_per_epoch=9, samples=9, micro_batch=1,
                         grad_accum=4, world=1) == "planned 40 optimizer steps (optim.max_steps)"  # fmt: skip
    text = planned_steps(
        150,
        max_steps=None,
        epochs=3,
        micro_steps_per_epoch=100,
        samples=200,
        micro_batch=1,
        grad_accum=2,
        world=2,
    )
    assert text == (
        "planned 150 optimizer steps = 3 epochs x 100 micro-steps per epoch "
        "(ceil(200 samples / (micro_batch 1 x world 2))) / grad_accum 2"
    )


def _run(progress: TrainProgress, steps: int) -> None:
    with progress:
        progress.say("planned")
        for step in range(progress.start + 1, steps + 1):
            progress.update({**RECORD, "step": step})


def test_plain_lines_every_log_every_steps_off_a_terminal():
    stream = io.StringIO()
    _run(TrainProgress(total=7, start=0, log_every=3, rank=0, stream=stream), 7)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "planned"
    assert [int(re.match(r"step (\d+)/7 ", line)[1]) for line in lines[1:]] == [1, 3, 6, 7]
    # ETA: the mean step time of this run times the steps left; s/step: the mean since the previous line.
    assert lines[2].endswith("1.50 s/step  ETA 6s") and lines[4].endswith("ETA 0s")


def test_other_ranks_print_nothing():
    stream = io.StringIO()
    _run(TrainProgress(total=4, start=0, log_every=1, rank=1, stream=stream), 4)
    assert stream.getvalue() == ""


def test_tiny_training_prints_planned_steps_and_progress_lines(tmp_path, capsys):
    data = generate_split(tmp_path / "data", n_scenes=2, seed=0, views="single").path
    config = load_config(
        overrides=[
            f"data.train={data}",
            f"run.output_dir={tmp_path / 'run'}",
            "distill.recipe=perception",
            "optim.max_steps=4",
            "optim.grad_accum=1",
            "run.log_every=2",
            "run.report_to=[]",
            "run.resume=false",
            "run.save_every=1000",
        ]
    )
    Trainer(config).train()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "planned 4 optimizer steps (optim.max_steps)"
    steps = [line for line in out if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/4", "2/4", "4/4"]
    pattern = r"step \d/4  ce \S+  perception \S+  lr \S+  \d+\.\d\d s/step  ETA \d+s"
    assert all(re.fullmatch(pattern, line) for line in steps), steps


def test_quickstart_config_plans_the_documented_steps(tmp_path, capsys):
    """configs/quickstart.yaml (README's first training example, issue 14, item 3) validates and plans the 60
    steps the README states; a 2-step run of it on a tiny synthetic split trains and prints its progress."""
    config = load_config(QUICKSTART)
    assert (config.optim.max_steps, config.optim.grad_accum, config.distill.recipe) == (60, 1, "multi")
    assert "`planned 60 optimizer steps (optim.max_steps)`" in " ".join(README.read_text().split())
    data = generate_split(tmp_path / "data", n_scenes=2, seed=0, views="single").path
    short = load_config(
        QUICKSTART, [f"data.train={data}", f"run.output_dir={tmp_path / 'run'}", "optim.max_steps=2"]
    )
    assert Trainer(short).train().steps == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "planned 2 optimizer steps (optim.max_steps)"
    assert [line.split("  ")[0] for line in out[1:]] == ["step 1/2", "step 2/2"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar_with_per_term_losses_not_plain_lines():
    stream = _Terminal()
    _run(TrainProgress(total=3, start=0, log_every=1, rank=0, stream=stream), 3)
    text = stream.getvalue()
    assert "planned" in text and "ce 3  perception 2e-09  lr 4.90e-05" in text
    assert not re.search(r"step \d/3 ", text)  # the bar's "3/3 steps", not the plain lines
