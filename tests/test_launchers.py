"""Launchers on CPU (issue 14, item 8): ``torchrun`` starts one training process per ``--nproc_per_node``;
``accelerate launch --num_processes N`` without a GPU starts one process (docs/training.md, Several processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drivekd.data.synthetic import generate_split

BIN = Path(sys.executable).parent
TINY_RUN = [
    "distill.recipe=sft",
    "optim.max_steps=1",
    "optim.grad_accum=1",
    "run.save_every=1",
    "run.report_to=[]",
    "run.resume=false",
]


def _launch(launcher: list[str], tmp_path: Path) -> tuple[list[int], str]:
    """Launch a one-step tiny run; return the process count each logged step saw and the console output."""
    data = generate_split(tmp_path / "data", n_scenes=2, seed=0, views="single").path
    out = tmp_path / "run"
    args = [*launcher, "-m", "drivekd.cli", "train", f"data.train={data}", f"run.output_dir={out}", *TINY_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worlds = [json.loads(line)["world"] for line in (out / "log.jsonl").read_text().splitlines()]
    return worlds, done.stdout + done.stderr


@pytest.mark.slow
def test_torchrun_starts_one_process_per_rank_on_cpu(tmp_path):
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    worlds, output = _launch(torchrun, tmp_path)
    assert worlds == [2]
    # Rank 0 alone prints (issue 14, item 4): the plan, the step line and the summary once, not once per rank.
    lines = ("planned 1 optimizer steps", "step 1/1 ", "trained 1 steps")
    assert [output.count(line) for line in lines] == [1, 1, 1], output[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="describes a machine without a GPU")
def test_accelerate_launch_runs_one_process_on_cpu(tmp_path):
    accelerate = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1"]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    assert _launch(accelerate, tmp_path)[0] == [1]
