"""Trainer options users of TRL/DistillKit expect (issue 14, item 7): freezing modules by name, processor image
budgets, evaluation on a val split with a kept best checkpoint, and experiment trackers."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from drivekd.data.synthetic import generate_split
from drivekd.errors import DriveKDError
from drivekd.models.families import load_pretrained
from drivekd.models.pair import build_tiny_pair
from drivekd.training.checkpoint import list_checkpoints, problem
from drivekd.training.config import ConfigError, load_config
from drivekd.training.freeze import FreezeError
from drivekd.training.trainer import Trainer

QUIET = ["run.report_to=[]", "run.resume=false", "run.save_every=1000", "optim.grad_accum=1"]


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


def _vision_tokens(trainer: Trainer) -> int:
    return int(trainer.collate(trainer.samples[:1]).roles.vision.sum())


@pytest.mark.parametrize(
    ("family", "option"),
    [("qwen2_5_vl", "max_pixels=3136"), ("qwen3_vl", "max_pixels=4096"), ("internvl", "max_patches=1")],
)
def test_the_image_budget_sets_the_vision_tokens_of_student_and_teacher(data, tmp_path, family, option):
    pair = build_tiny_pair(family, seed=42)  # a teacher folder with its own processor
    pair.teacher.save_pretrained(tmp_path / "teacher")
    pair.teacher_processor.save_pretrained(tmp_path / "teacher")
    common = [
        "optim.max_steps=1",
        "distill.recipe=perception",
        f"model.family={family}",
        f"model.teacher={tmp_path / 'teacher'}",
    ]
    default = Trainer(_config(data, tmp_path / "default", *common))
    budget = Trainer(
        _config(data, tmp_path / "budget", *common, f"model.processor.{option}", "run.save_every=1")
    )
    assert 0 < _vision_tokens(budget) < _vision_tokens(default)
    assert budget.models.teacher_processors[0] is not budget.models.processor
    # the teacher's own processor got the budget too: its layout is checked against the student's before training
    result = budget.train()
    saved = budget.family.load_processor(result.checkpoint / "student")
    key, value = option.split("=")
    setting = (
        saved.image_processor.size["longest_edge"]
        if key == "max_pixels"
        else saved.image_processor.max_patches
    )
    assert setting == int(value)


def test_an_image_budget_of_another_family_is_refused_by_name(data, tmp_path):
    with pytest.raises(DriveKDError, match=r"model.processor.max_pixels does not apply to internvl"):
        Trainer(_config(data, tmp_path, "model.family=internvl", "model.processor.max_pixels=3136"))
    with pytest.raises(ConfigError, match=r"model.processor.*min_pixels=9 is above max_pixels=4"):
        _config(data, tmp_path, "model.processor.min_pixels=9", "model.processor.max_pixels=4")


def test_validation_records_and_a_best_checkpoint_outside_the_rotation(data, tmp_path, monkeypatch):
    val = generate_split(tmp_path / "val", n_scenes=1, seed=1, views="single", split="val").path
    out = tmp_path / "run"
    options = [
        f"data.val={val}",
        "run.eval_every=1",
        "run.save_every=1",
        "run.keep_checkpoints=1",
        "distill.recipe=perception",
        "optim.lr=1e-2",
        "optim.max_steps=4",
    ]
    first = Trainer(_config(data, out, *options))
    step = first.train_step

    def stop_after_two() -> dict:
        if first.step == 2:
            raise KeyboardInterrupt  # a run stopped after checkpoint-2 and its evaluation
        return step()

    monkeypatch.setattr(first, "train_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # rotated; best/ is not
    kept = json.loads((out / "best" / "best.json").read_text())
    assert problem(out / "best") is None
    model, _ = load_pretrained(out / "best" / "student")
    assert model.config.model_type == "qwen2_5_vl"

    resumed = Trainer(_config(data, out, *options, "run.resume=true"))
    assert resumed.validation.best == kept["val/loss"]  # what later evaluations must beat
    resumed.train()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "val/loss" in line]
    assert [e["step"] for e in evals] == [1, 2, 3, 4]
    for record in evals:
        assert record["val/loss"] == pytest.approx(record["val/ce"] + record["val/perception"])
        assert 0 <= record["val/mcq_accuracy"] <= 1
    assert len({e["val/loss"] for e in evals}) == 4  # the student changes between evaluations
    assert kept in evals[:2]
    assert json.loads((out / "best" / "best.json").read_text()) == min(evals, key=lambda e: e["val/loss"])
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"] and problem(out / "best") is None


def test_an_unknown_best_metric_is_named_before_training(data, tmp_path):
    val = generate_split(tmp_path / "val", n_scenes=1, seed=1, views="single", split="val").path
    with pytest.raises(
        DriveKDError, match=r"run.best_metric=val/kl .* use one of val/ce, val/loss, val/mcq_accuracy"
    ):
        Trainer(
            _config(data, tmp_path / "run", f"data.val={val}", "distill.recipe=sft", "run.best_metric=val/kl")
        )


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history rows of an offline W&B run file by step: a W&B header, then LevelDB-log records (32 KiB blocks,
    7-byte record headers: crc, length, kind 1 full / 2 first / 3 middle / 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, part, rows = run_file.read_bytes(), 7, 32768, b"", {}
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        part, pos = part + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows[row["_step"]] = row
    return rows


def test_report_to_wandb_offline_holds_the_logged_scalars(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # a dev extra (pyproject.toml), installed by .ci/run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = _config(data, out, "optim.max_steps=2", "distill.recipe=sft", "run.report_to=[wandb]")
    Trainer(config).train()
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and not (out / "tensorboard").exists()
    # W&B's service process writes the run file; on a loaded machine its rows were once not all there yet when
    # the run had finished (a full-suite run), so wait for them a little before comparing.
    deadline = time.monotonic() + 60
    while len(history := _wandb_history(runs[0])) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(history) == [line["step"] for line in logged] == [1, 2]
    for line in logged:
        assert {k: v for k, v in line.items() if k != "step"} == pytest.approx(
            {k: history[line["step"]][k] for k in line if k != "step"}
        )


def test_the_old_tensorboard_flag_reads_as_report_to_with_a_warning():
    assert load_config().run.report_to == ["tensorboard"]
    assert load_config(overrides=["run.report_to=[]"]).run.report_to == []
    with pytest.warns(FutureWarning, match=r"run.tensorboard is replaced by run.report_to"):
        assert load_config(overrides=["run.tensorboard=false"]).run.report_to == []
    with pytest.raises(ConfigError, match=r"run.tensorboard and run.report_to"):
        load_config(overrides=["run.tensorboard=true", "run.report_to=[wandb]"])
