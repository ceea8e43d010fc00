"""Trained students load everywhere: a LoRA checkpoint as base + adapter, a saved student with the transformers auto
classes (issue 14, items 1-2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.utils import is_torchvision_available
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import ModelSourceError
from drivekd.evaluation.predictions import read_predictions
from drivekd.models.families import FAMILIES, VIDEO_CONFIG, get_family
from drivekd.models.lora import ADAPTER_CONFIG, adapter_base, is_adapter
from drivekd.models.pair import build_tiny_pair, load_spec, tiny_spec
from drivekd.training.config import load_config
from drivekd.training.trainer import Trainer

runner = CliRunner()
SEED = 3
IDS = torch.tensor([[5, 17, 40, 99, 7, 256]])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, torch.Tensor, Path]:
    """A LoRA student trained two steps on synthetic data: its checkpoint's student folder, the trained model's
    logits on :data:`IDS`, and the data."""
    tmp = tmp_path_factory.mktemp("lora")
    data = generate_split(tmp / "data", n_scenes=2, seed=0, views="single").path
    config = load_config(
        overrides=[
            f"data.train={data}",
            f"run.output_dir={tmp / 'run'}",
            f"run.seed={SEED}",
            "run.report_to=[]",
            "run.resume=false",
            "run.save_every=2",
            "optim.max_steps=2",
            "optim.grad_accum=1",
            "optim.lr=1e-2",
            "distill.recipe=sft",
            "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
        ]
    )
    trainer = Trainer(config)
    result = trainer.train()
    student = trainer.models.student.eval()
    with torch.no_grad():
        logits = student(input_ids=IDS).logits
    return result.checkpoint / "student", logits, data


def _logits(model: PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_lora_checkpoint_records_its_base_and_loads_merged(lora_run):
    folder, trained, _ = lora_run
    assert is_adapter(folder) and not (folder / "config.json").exists()
    assert adapter_base(folder) == tiny_spec("qwen2_5_vl", "student", SEED)
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == adapter_base(
        folder
    )

    model, processor = load_spec(folder)
    assert type(model) is get_family("qwen2_5_vl").model_cls  # merged: a plain transformers model
    assert not any("lora_" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), trained, rtol=1e-4, atol=1e-5)
    base, _ = load_spec(adapter_base(folder))
    assert not torch.allclose(_logits(base), trained, atol=1e-4)  # the adapter changed the model
    assert (
        processor.tokenizer("stop").input_ids
        == build_tiny_pair("qwen2_5_vl").student_processor.tokenizer("stop").input_ids
    )


def test_lora_student_generates_scores_and_benchmarks(lora_run, tmp_path):
    folder, _, data = lora_run
    preds = tmp_path / "preds.jsonl"
    args = ["eval", "generate", str(data), "--model", str(folder), "--out", str(preds), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "4", "--limit", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(read_predictions(preds)) == 3

    scores = tmp_path / "scores.json"
    args = ["eval", "score", str(data), "--predictions", str(preds), "--out", str(scores), "--no-judge"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(scores.read_text())
    assert report["samples"] == len(list(read_jsonl(data))) and report["model"] == str(folder)

    build_tiny_pair("qwen2_5_vl", seed=SEED).save(tmp_path / "pair")
    bench = tmp_path / "bench.json"
    args = ["bench", "inference", "--teacher", str(tmp_path / "pair" / "teacher"), "--student", str(folder)]
    args += [
        "--n-samples",
        "1",
        "--max-new-tokens",
        "2",
        "--ttft-runs",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, [*args, "--student-name", "lora", "--json", str(bench)])
    assert result.exit_code == 0, result.output
    rows = json.loads(bench.read_text())["results"]
    assert rows["student"]["name"] == "lora" and rows["student"]["throughput_tok_s"] > 0


def test_adapter_without_a_base_is_a_named_error(lora_run, tmp_path):
    folder, _, _ = lora_run
    copy = tmp_path / "adapter"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((copy / ADAPTER_CONFIG).read_text()) | {"base_model_name_or_path": None}
    (copy / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="does not name its base model"):
        load_spec(copy)


def test_tiny_specs():
    pair = build_tiny_pair("internvl", seed=5)
    assert pair.student.name_or_path == "tiny:internvl:student:5"
    model, _ = load_spec("tiny:internvl:student:5")
    torch.testing.assert_close(_logits(model), _logits(pair.student))
    assert build_tiny_pair("internvl", image_size=(224, 112)).student.name_or_path == ""  # not rebuildable
    with pytest.raises(ModelSourceError, match=re.escape("tiny:<family>:<teacher|student>:<seed>")):
        load_spec("tiny:internvl:pupil:5")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_student_loads_with_the_transformers_auto_classes(family, tmp_path):
    pair = build_tiny_pair(family)
    pair.save(tmp_path)
    folder = tmp_path / "student"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model) is type(pair.student)
    torch.testing.assert_close(_logits(model), _logits(pair.student))

    video = json.loads((folder / VIDEO_CONFIG).read_text())
    adapter = get_family(family)
    assert video["video_processor_type"] == adapter.video_processor_type
    image = json.loads(json.dumps(pair.student_processor.image_processor.to_dict()))  # lists, as saved
    assert all(video[key] == image[key] for key in ("size", "image_mean", "image_std", "do_resize"))
    if not is_torchvision_available():
        # Every processor class of these families builds a video processor, which needs torchvision; the saved
        # folder is complete when that is the only thing missing (before, the video config itself was absent).
        with pytest.raises(ImportError, match=f"{adapter.video_processor_type} requires the Torchvision"):
            AutoProcessor.from_pretrained(folder)
        return
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template([{"role": "user", "content": "stop"}], tokenize=False)
    assert processor.tokenizer(text).input_ids == pair.student_processor.tokenizer(text).input_ids
