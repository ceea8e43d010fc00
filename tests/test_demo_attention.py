"""The demo's attention figure: the token-grid heat map against hand-built blocks, and the figure of a tiny pair."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from drivekd.data.collate import VLMCollator
from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.demo.attention import attention_figure, pick_questions, sample_heatmap, vision_grid
from drivekd.models.pair import TINY_IMAGE_SIZE, build_tiny_pair


def test_mass_on_one_token_lands_on_its_cell():
    # grid_thw (1, 4, 6) patches with merge 2 -> 2 x 3 tokens; token 4 is row 1, column 1 (row-major).
    block = torch.zeros(3, 6)
    block[0, 4] = 0.3
    block[1, 4] = 0.1
    block[2, 0] = 0.9  # a row that is not selected
    grid = vision_grid(block, torch.tensor([True, True, False]), torch.tensor([[1, 4, 6]]), 2)
    expected = torch.zeros(2, 3)
    expected[1, 1] = 1.0
    torch.testing.assert_close(grid, expected)


def test_rows_are_averaged_then_normalised_over_vision():
    block = torch.tensor([[0.2, 0.0, 0.0, 0.2], [0.0, 0.1, 0.0, 0.1]])
    grid = vision_grid(block, torch.tensor([True, True]), torch.tensor([[1, 4, 4]]), 2)
    torch.testing.assert_close(grid, torch.tensor([[0.1, 0.05], [0.0, 0.15]]) / 0.3)
    assert grid.sum().item() == pytest.approx(1.0)


def test_several_images_and_mismatched_blocks_are_refused():
    with pytest.raises(ValueError, match="single-image"):
        vision_grid(torch.ones(1, 4), torch.tensor([True]), torch.tensor([[1, 2, 2], [1, 2, 2]]), 1)
    with pytest.raises(ValueError, match="vision keys"):
        vision_grid(torch.ones(1, 5), torch.tensor([True]), torch.tensor([[1, 4, 4]]), 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    generate_split(root, n_scenes=1, seed=0, image_size=TINY_IMAGE_SIZE, split="test")
    return root, list(read_jsonl(root / "test.jsonl")), build_tiny_pair("qwen2_5_vl")


def test_heatmap_of_a_model_is_a_distribution_on_the_processor_grid(tiny):
    root, samples, pair = tiny
    picked = pick_questions(samples)
    assert [s.capability for s in picked] == ["perception"] * 2 + ["planning"] * 2
    assert [s.kind for s in picked[:2]] == ["mcq", "mcq"] and not any(s.multi_view for s in picked)
    heat = sample_heatmap(pair.teacher, pair.teacher_processor, picked[0], root)
    image_processor = pair.teacher_processor.image_processor
    grid = image_processor(images=[Image.new("RGB", TINY_IMAGE_SIZE)], return_tensors="pt")["image_grid_thw"][
        0
    ]
    merge = image_processor.merge_size
    assert heat.shape == (int(grid[1]) // merge, int(grid[2]) // merge)
    assert heat.min() >= 0 and heat.sum() == pytest.approx(1.0, abs=1e-5)
    six = next(s for s in samples if s.multi_view)
    with pytest.raises(ValueError, match="single-image"):
        sample_heatmap(pair.student, pair.student_processor, six, root)


def test_heatmap_equals_the_eager_attention_of_the_answer_rows(tiny):
    # Independent reference: transformers' eager attention (output_attentions) at decoder index 0 (paper layer 1),
    # head mean, the answer's text-query rows (the closing <|im_end|> label is no text query) x vision keys,
    # averaged and normalised by hand.
    root, samples, pair = tiny
    sample = pick_questions(samples)[0]
    model, processor = pair.student, pair.student_processor
    heat = sample_heatmap(model, processor, sample, root, layer=1)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    batch = VLMCollator(processor, pair.family.image_token_id(model), image_root=root)([sample])
    with torch.no_grad():
        maps = eager.eval()(**batch.inputs, output_attentions=True).attentions[0][0].mean(dim=0)
    vision = batch.roles.vision[0]
    rows = maps[batch.roles.answer[0] & batch.roles.text[0]][:, vision].mean(dim=0)
    grid = batch.inputs["image_grid_thw"][0]
    merge = processor.image_processor.merge_size
    expected = (rows / rows.sum()).view(int(grid[1]) // merge, int(grid[2]) // merge)
    np.testing.assert_allclose(heat, expected.numpy(), rtol=1e-4, atol=1e-7)


def test_attention_figure_writes_a_png(tiny, tmp_path):
    root, samples, pair = tiny
    models = {
        "teacher": (pair.teacher, pair.teacher_processor),
        "student": (pair.student, pair.student_processor),
    }
    path = attention_figure(models, pick_questions(samples, 1), root, tmp_path / "attention.png")
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100
