"""Family adapters and tiny teacher/student pairs: build offline, differ in shape, share a layout, round-trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from drivekd.data.collate import VLMCollator
from drivekd.errors import LayoutMismatchError
from drivekd.models.families import FAMILIES, family_of, get_family
from drivekd.models.pair import build_tiny_pair, load_pair


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_pair_differs_in_shape_and_shares_layout(family, image_dir, samples):
    pair = build_tiny_pair(family)
    t, s = pair.teacher.config.get_text_config(), pair.student.config.get_text_config()
    assert t.num_hidden_layers > s.num_hidden_layers
    assert t.hidden_size > s.hidden_size
    assert t.num_attention_heads > s.num_attention_heads
    assert t.num_attention_heads > t.num_key_value_heads  # grouped-query attention in the teacher
    pair.check_layout(samples, image_dir)
    assert family_of(pair.student) is get_family(family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_reload_round_trips(family, tmp_path, image_dir, samples):
    pair = build_tiny_pair(family, seed=3)
    pair.save(tmp_path)
    loaded = load_pair(family, tmp_path / "teacher", tmp_path / "student", dtype=torch.float32)
    for before, after in ((pair.teacher, loaded.teacher), (pair.student, loaded.student)):
        assert before.state_dict().keys() == after.state_dict().keys()
        for name, tensor in before.state_dict().items():
            assert torch.equal(tensor, after.state_dict()[name]), name
    original = VLMCollator(
        pair.student_processor, pair.family.image_token_id(pair.student), image_root=image_dir
    )
    reloaded = VLMCollator(
        loaded.student_processor, loaded.family.image_token_id(loaded.student), image_root=image_dir
    )
    a, b = original(samples), reloaded(samples)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert torch.equal(a.inputs["pixel_values"], b.inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(pair.student(**a.inputs).logits, loaded.student(**b.inputs).logits)
    # Plain transformers can read what was saved.
    assert AutoConfig.from_pretrained(tmp_path / "student").model_type in FAMILIES[family].model_types
    assert isinstance(
        AutoModelForImageTextToText.from_pretrained(tmp_path / "teacher"), FAMILIES[family].model_cls
    )


def test_pair_with_different_token_layouts_is_refused(image_dir, samples):
    pair = build_tiny_pair("qwen2_5_vl")
    other = build_tiny_pair("qwen2_5_vl", image_size=(224, 126))  # more vision tokens per image
    pair.teacher_processor = other.teacher_processor
    with pytest.raises(LayoutMismatchError, match="tokenise sample 'single' differently"):
        pair.check_layout(samples, image_dir)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        get_family("llama")
    with pytest.raises(ValueError, match="not supported"):
        family_of(AutoConfig.for_model("bert"))
