"""Batched generation with a tiny model: one record per sample, resume after a crash with no loss or duplicates."""

from __future__ import annotations

import pytest
import torch

from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DataError
from drivekd.evaluation.generate import count_new_tokens, generate_hf, load_model
from drivekd.evaluation.inputs import load_samples
from drivekd.evaluation.predictions import PredictionWriter, read_predictions
from drivekd.models.pair import build_tiny_pair


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads stall on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    split = generate_split(folder, n_scenes=1, seed=3, split="test")
    return list(read_jsonl(split.path))[:7], folder


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    build_tiny_pair("qwen2_5_vl").save(folder)
    return folder / "student"


def _generate(samples, model, processor, path, root, **kwargs):
    with PredictionWriter(path, model="tiny") as writer:
        return generate_hf(
            samples, model, processor, writer, image_root=root, max_new_tokens=6, progress=False, **kwargs
        )


def test_count_new_tokens_stops_at_the_first_eos():
    generated = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0], [5, 2, 6, 1, 0]])
    naive = []
    for row in generated.tolist():
        n = len(row)
        for k, token in enumerate(row):
            if token in (1, 2):
                n = k + 1
                break
        naive.append(n)
    assert count_new_tokens(generated, {1, 2}) == naive == [3, 5, 1, 2]


def test_generate_resumes_after_a_crash_without_loss_or_duplicates(synth, student_dir, tmp_path, monkeypatch):
    samples, root = synth
    model, processor = load_model(student_dir)  # a checkpoint folder, as a trained student is saved
    clean = tmp_path / "clean.jsonl"
    summary = _generate(samples, model, processor, clean, root, batch_size=3)
    assert summary.written == len(samples) and summary.skipped == 0
    reference = read_predictions(clean)
    assert list(reference) == [s.id for s in samples]
    assert all(0 < r.new_tokens <= 6 and r.model == "tiny" for r in reference.values())

    crashed = tmp_path / "crashed.jsonl"
    real_generate, calls = model.generate, {"n": 0}

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _generate(samples, model, processor, crashed, root, batch_size=3)
    assert list(read_predictions(crashed)) == [s.id for s in samples[:3]]
    first_batch = crashed.read_text()
    monkeypatch.setattr(model, "generate", real_generate)
    summary = _generate(samples, model, processor, crashed, root, batch_size=3)
    assert (summary.skipped, summary.written) == (3, len(samples) - 3)
    assert crashed.read_text().startswith(first_batch)
    resumed = read_predictions(crashed)  # raises on a duplicate id
    assert {k: r.prediction for k, r in resumed.items()} == {k: r.prediction for k, r in reference.items()}


def test_a_drivebench_file_needs_its_image_root(tmp_path):
    path = tmp_path / "drivebench.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="--image-root"):
        load_samples(path)
