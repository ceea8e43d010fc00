"""Collation through the real processors: answer-span labels, role masks, padding on both sides."""

from __future__ import annotations

import pytest
import torch

from drivekd.data.collate import IGNORE_INDEX, VLMCollator, special_token_ids
from drivekd.data.schema import Sample
from drivekd.errors import DataError
from drivekd.evaluation.choices import extract_choice
from drivekd.models.families import FAMILIES
from drivekd.models.pair import build_tiny_pair


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    return build_tiny_pair(request.param)


@pytest.mark.parametrize("side", ["left", "right"])
def test_roles_and_labels(pair, side, image_dir, samples):
    collate = VLMCollator(
        pair.student_processor,
        pair.family.image_token_id(pair.student),
        image_root=image_dir,
        padding_side=side,
    )
    batch = collate(samples)
    ids, roles, tok = batch.inputs["input_ids"], batch.roles, pair.student_processor.tokenizer
    special = torch.isin(ids, torch.tensor(sorted(special_token_ids(tok))))
    # The roles partition the tokens: padding, vision, text and the remaining special tokens.
    assert not (roles.vision & roles.text).any() and not (roles.padding & (roles.vision | roles.text)).any()
    assert torch.equal(roles.vision | roles.text | roles.padding | special, torch.ones_like(roles.text))
    assert torch.equal(batch.inputs["attention_mask"].bool(), ~roles.padding)
    pad_at_start = roles.padding[:, 0].any()
    assert bool(pad_at_start) == (side == "left")
    for row, sample in enumerate(samples):
        answer = ids[row][batch.labels[row] != IGNORE_INDEX]
        assert torch.equal(batch.labels[row][roles.answer[row]], ids[row][roles.answer[row]])
        text = tok.decode(answer)
        assert text.startswith(sample.full_answer) and text.endswith(tok.eos_token)
        # The answer span is contiguous and last among the real tokens.
        positions = roles.answer[row].nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))
        assert positions[-1] == (~roles.padding[row]).nonzero().max()
        expected_images = len(sample.images)
        assert int(roles.vision[row].sum()) % expected_images == 0
    if "mm_token_type_ids" in batch.inputs:  # Qwen's mrope needs it; image tokens are type 1
        assert torch.equal(batch.inputs["mm_token_type_ids"] == 1, roles.vision)


def test_rationale_first_supervises_the_rationale_then_a_final_line(pair, image_dir, samples):
    """data.answer_order=rationale_first: a choice question's answer span is the rationale, then "Final:
    <answer>", then the end of turn (an open one keeps the default layout); the prompt is the same tokens as with
    the default layout, and the strict reader takes the choice."""
    kwargs = {"image_root": image_dir}
    token = pair.family.image_token_id(pair.student)
    first = VLMCollator(pair.student_processor, token, **kwargs)
    last = VLMCollator(pair.student_processor, token, answer_order="rationale_first", **kwargs)
    tok = pair.student_processor.tokenizer
    with_rationale = [s for s in samples if s.rationale]
    assert with_rationale
    for sample in with_rationale:
        a, b = first([sample]), last([sample])
        prompt_a = a.inputs["input_ids"][0][a.labels[0] == IGNORE_INDEX]
        prompt_b = b.inputs["input_ids"][0][b.labels[0] == IGNORE_INDEX]
        assert torch.equal(prompt_a, prompt_b)
        text = tok.decode(b.inputs["input_ids"][0][b.labels[0] != IGNORE_INDEX])
        laid_out = (
            sample.full_answer if sample.kind == "open" else f"{sample.rationale}\nFinal: {sample.answer}"
        )
        assert text.startswith(laid_out) and text.endswith(tok.eos_token)
        if sample.kind == "mcq":
            assert extract_choice(text, "strict") == extract_choice(sample.answer, "strict")


def test_rationale_option_first_restates_the_chosen_option_before_the_letter(pair, image_dir, samples):
    """data.answer_order=rationale_option_first: an MCQ's answer span is the rationale, a "Chosen:" line with the
    text the question lists under the correct letter, then "Final: <letter>"; yes/no keeps rationale_first's
    layout; the strict reader still takes exactly the gold letter (the option text is never read as one)."""
    token = pair.family.image_token_id(pair.student)
    collate = VLMCollator(
        pair.student_processor, token, image_root=image_dir, answer_order="rationale_option_first"
    )
    tok = pair.student_processor.tokenizer
    mcqs = [s for s in samples if s.kind == "mcq" and s.rationale]
    assert mcqs
    for sample in [s for s in samples if s.rationale]:
        batch = collate([sample])
        text = tok.decode(batch.inputs["input_ids"][0][batch.labels[0] != IGNORE_INDEX])
        if sample.kind == "mcq":
            listed = f"{sample.answer}. {sample.options[sample.answer]}"
            assert listed in sample.question  # the Chosen text is what the letter labels in the question
            laid_out = f"{sample.rationale}\nChosen: {sample.options[sample.answer]}\nFinal: {sample.answer}"
            assert extract_choice(text, "strict") == sample.answer
        else:
            laid_out = sample.target_text("rationale_first")
        assert text.startswith(laid_out) and text.endswith(tok.eos_token)


def test_batched_logits_equal_single_sample_logits(pair, image_dir, samples):
    for side in ("left", "right"):
        collate = VLMCollator(
            pair.student_processor,
            pair.family.image_token_id(pair.student),
            image_root=image_dir,
            padding_side=side,
        )
        batch = collate(samples)
        with torch.no_grad():
            batched = pair.student(**batch.inputs).logits
            for row, sample in enumerate(samples):
                single = collate([sample])
                alone = pair.student(**single.inputs).logits[0]
                torch.testing.assert_close(batched[row][batch.roles.valid[row]], alone, rtol=1e-4, atol=1e-5)


def test_missing_image_names_the_sample(pair, image_dir):
    broken = Sample(
        id="lost",
        images=[{"camera": "CAM_FRONT", "path": "nowhere.png"}],
        question="Q?",
        answer="A",
        capability="perception",
        task="perception",
        kind="open",
    )
    collate = VLMCollator(
        pair.student_processor, pair.family.image_token_id(pair.student), image_root=image_dir
    )
    with pytest.raises(DataError, match=r"row lost, field 'images.0.path'"):
        collate([broken])
