"""Trainer options users of TRL/DistillKit expect (issue 14, item 7): freezing modules by name, processor image
budgets, evaluation on a val split with a kept best checkpoint, and experiment trackers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drivekd.data.synthetic import generate_split
from drivekd.training.config import load_config
from drivekd.training.freeze import FreezeError
from drivekd.training.trainer import Trainer

QUIET = ["run.tensorboard=false", "run.resume=false", "run.save_every=1000", "optim.grad_accum=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("train"), n_scenes=3, seed=0, views="single").path


def _config(data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"data.train={data}", f"run.output_dir={out}", *QUIET, *overrides])


def test_a_frozen_vision_tower_keeps_its_weights_while_the_decoder_trains(data, tmp_path, capsys):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=2",
        "optim.lr=1e-2",
        "distill.recipe=sft",
        "model.freeze=[vision_tower]",
    )
    trainer = Trainer(config)
    assert "student parameters frozen" in capsys.readouterr().err
    student = trainer.models.student
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    vision = [n for n in before if ".visual." in f".{n}"]
    assert vision and all(not p.requires_grad for n, p in student.named_parameters() if n in vision)
    trainer.train()
    after = dict(student.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in vision)
    decoder = [n for n in before if "language_model.layers" in n]
    assert any(not torch.equal(after[n], before[n]) for n in decoder)


def test_an_unmatched_freeze_pattern_is_named(data, tmp_path):
    with pytest.raises(FreezeError, match=r"'vison\.\*' matches no parameter"):
        Trainer(
            _config(data, tmp_path, "optim.max_steps=1", "distill.recipe=sft", "model.freeze=['vison.*']")
        )
