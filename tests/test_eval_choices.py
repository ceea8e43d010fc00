"""MCQ letter extraction: hand-written tricky answers in both modes, and properties against naive references."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.evaluation import extract_choice
from drivekd.evaluation.choices import extract_yes_no

# (answer, strict, drivebench rule)
TRICKY = [
    ("B. It is a car", "B", "A"),  # the upstream defect: the article "a" is read as option A
    ("a) the car is turning left", "A", "A"),
    ("Option C", "C", "C"),
    ("option c is the right one", "C", "C"),
    ("b", "B", "B"),
    ("answer: d", "D", "D"),
    ("none", None, None),
    ("None of the options fits.", None, None),
    ("", None, None),
    ("The answer is a car turning left.", None, "A"),
    ("A car is turning left.", None, "A"),
    ("A. Going ahead. B. Stopped. C. Turn left.", None, "A"),  # echoes the options: ambiguous
    ("A. No wait, the answer is C.", None, "A"),  # two explicit choices disagree
    ("I think it's B, not A.", None, "A"),  # no explicit choice
    ("Final: A. Turn right.", "A", "A"),
    (
        "Answer: C. Going ahead.\n\nExplanation: Object c3 is the silver van in the center lane ahead.",
        "C",
        "C",
    ),
    ("(B)", "B", "B"),
    ("**Answer:** B", "B", "B"),
    ("The correct answer is (D).", "D", "D"),
    ("Answer: A because the light is red", "A", "A"),
    ("B\nBecause the brake lights are on.", "B", "B"),
    ("[C] turn right", "C", "C"),
    ("3D view of the road", None, None),
]


@pytest.mark.parametrize(("text", "strict", "drivebench"), TRICKY)
def test_tricky_answers(text, strict, drivebench):
    assert extract_choice(text, mode="strict") == strict
    assert extract_choice(text, mode="drivebench") == drivebench


def test_default_mode_is_strict_and_unknown_modes_are_refused():
    assert extract_choice("B. It is a car") == "B"
    with pytest.raises(ValueError, match="unknown choice mode"):
        extract_choice("B", mode="loose")  # type: ignore[arg-type]


def _upstream_reference(text: str) -> str | None:
    """The DriveBench rule written independently: the first of a, b, c, d that is a whole word."""
    tokens = set(re.findall(r"\w+", text.lower()))
    return next((letter.upper() for letter in "abcd" if letter in tokens), None)


@settings(deadline=None)
@given(st.text(alphabet="abcdeABCDE xyz.,()\n-'_1", max_size=40))
def test_drivebench_mode_matches_the_upstream_rule(text):
    assert extract_choice(text, mode="drivebench") == _upstream_reference(text)


FILLER = st.lists(
    st.sampled_from(
        ["the", "car", "is", "turning", "left", "stopped", "pedestrian", "red", "light", "ahead", "so"]
    ),
    max_size=12,
).map(" ".join)


@settings(deadline=None)
@given(letter=st.sampled_from("ABCD"), filler=FILLER, lower=st.booleans())
def test_strict_reads_an_explicit_answer_whatever_follows(letter, filler, lower):
    shown = letter.lower() if lower else letter
    assert extract_choice(f"Answer: {shown}. {filler}", mode="strict") == letter
    assert extract_choice(f"({shown}) {filler}", mode="strict") == letter


@settings(deadline=None)
@given(FILLER)
def test_text_without_a_letter_is_unparsed(filler):
    assert extract_choice(filler, mode="strict") is None
    assert extract_choice(filler, mode="drivebench") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("no, it is not", "no"),
        ("The answer is yes", "yes"),
        ("Nope", None),
        ("", None),
        ("A red car is ahead in the ego lane.\nFinal: Yes", "yes"),  # data.answer_order=rationale_first
        ("No.\nFinal: yes", None),  # the two disagree
    ],
)
def test_yes_no(text, expected):
    assert extract_yes_no(text) == expected
