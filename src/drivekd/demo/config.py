"""The demo's settings: one frozen dataclass and the two presets (``QUICK`` for the test suite, ``FULL``).

Every trained method gets the same optimiser, learning rate, schedule, batch and step count; only the recipe and
the gradient method differ (see :mod:`drivekd.demo.methods`). The numbers were chosen once, before any
distillation run was looked at, to fit the time budget on 2 CPU cores (full <= 15 minutes, quick <= 3 minutes):

* the paper fine-tunes pre-trained billion-parameter students with AdamW at 5e-5 for 3 epochs; the demo trains
  randomly initialised tiny students for a few hundred steps, where 5e-5 moves nothing. The learning rate was set
  on the SFT baseline alone: after 160 steps, 2e-3 and 3e-3 left SFT repeating one letter, 5e-3 reached the
  answer templates;
* online loss reweighting (appendix B.1) is off for every method: its AdamW step of 3e-4 moves a weight by at most
  about 0.05 over 160 steps, while its Gramian rows cost 30-55% of a distillation step here;
* 160 steps x 8 trained methods x 3 seeds is what fits the budget with evaluation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides a demo's numbers (written to ``<out>/demo.json``; a rerun must match it)."""

    preset: str
    seeds: tuple[int, ...]
    # Synthetic data: scenes per split (each scene gives 8 question types x {single, six-view} = 16 samples).
    train_scenes: int
    val_scenes: int
    test_scenes: int
    # Training, identical for every method.
    steps: int
    lr: float
    warmup_ratio: float
    micro_batch: int  # samples of each capability the recipe trains on, per micro-step
    grad_accum: int
    reweight: bool  # online loss reweighting (appendix B.1) for every recipe with more than one loss
    # Evaluation.
    max_new_tokens: int  # greedy generation budget per answer, the same for every model
    eval_batch_size: int
    judge_runs: int
    drivelm_frames: int  # DriveLM key frames evaluated when ../shared is present (0: skip)
    prestudy_samples: int  # val samples the teacher's pre-study analysis reads
    bench_requests: int  # deployment metrics: requests, tokens per request, one-token runs for TTFT
    bench_tokens: int
    bench_ttft_runs: int
    family: str = "qwen2_5_vl"
    data_seed: int = 0
    image_size: tuple[int, int] = (112, 63)  # the tiny pair's processor size (W, H)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as they read back from demo.json


FULL = DemoConfig(
    preset="full",
    seeds=(0, 1, 2),
    train_scenes=60,
    val_scenes=4,
    test_scenes=8,
    steps=160,
    lr=5e-3,
    warmup_ratio=0.1,
    micro_batch=1,
    grad_accum=1,
    reweight=False,
    max_new_tokens=64,
    eval_batch_size=16,
    judge_runs=5,
    drivelm_frames=9,
    prestudy_samples=48,
    bench_requests=4,
    bench_tokens=16,
    bench_ttft_runs=5,
)

# The same settings with one seed, fewer steps and samples: a smoke run of every stage (the test suite runs it).
QUICK = replace(
    FULL,
    preset="quick",
    seeds=(0,),
    train_scenes=12,
    val_scenes=2,
    test_scenes=2,
    steps=60,
    max_new_tokens=48,
    drivelm_frames=1,
    prestudy_samples=16,
    bench_requests=2,
    bench_tokens=8,
    bench_ttft_runs=3,
)

PRESETS = {c.preset: c for c in (QUICK, FULL)}
