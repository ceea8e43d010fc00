"""The offline grader: rubric points from structured ground truth, and the simple grader for other data."""

from __future__ import annotations

import pytest

from drivekd.data.schema import Sample, read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.evaluation.offline import action_share, facts_for, facts_from_text, grade, language_share, recall
from drivekd.evaluation.rubrics import RUBRICS, ground_truth_text, rubric_for


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    split = generate_split(tmp_path_factory.mktemp("synth"), n_scenes=4, seed=5, split="test")
    return [(s, RUBRICS[r]) for s in read_jsonl(split.path) if (r := rubric_for(s)) is not None]


def test_points_stay_within_each_criterion_and_are_deterministic(judged):
    for sample, rubric in judged:
        for prediction in (sample.full_answer, sample.answer, "", "I do not know.", "A. B. C."):
            first = grade(rubric, facts_for(sample, prediction))
            assert first == grade(rubric, facts_for(sample, prediction))
            assert first.method == "structured"
            assert set(first.points) == {c.key for c in rubric.criteria}
            assert all(0 <= first.points[c.key] <= c.points for c in rubric.criteria)


def test_the_reference_answer_beats_empty_and_off_topic_answers(judged):
    for sample, rubric in judged:
        full = grade(rubric, facts_for(sample, sample.full_answer)).total
        assert grade(rubric, facts_for(sample, "")).total == 0
        assert full >= 50, (sample.id, sample.meta["question_type"])
        assert full > grade(rubric, facts_for(sample, "I do not know.")).total


def test_the_answer_letter_is_worth_exactly_its_points(judged):
    for sample, rubric in judged:
        if sample.kind != "mcq":
            continue
        wrong = next(k for k in sample.options if k != sample.answer)
        explanation = sample.rationale or ""
        right = grade(rubric, facts_for(sample, f"{sample.answer}. {explanation}")).points
        bad = grade(rubric, facts_for(sample, f"{wrong}. {explanation}")).points
        key = "answer" if "answer" in right else "action"
        assert right[key] == rubric.criteria[0].points and bad[key] == 0
        assert {k: v for k, v in right.items() if k != key} == {k: v for k, v in bad.items() if k != key}


def _drivelm_like(kind: str) -> Sample:
    return Sample(
        id="scene_frame_planning_0",
        images=[{"camera": "CAM_FRONT", "path": "x.jpg"}],
        question="What is the moving status of object <c1,CAM_BACK,0.6802,0.5528>? A. Going ahead. B. Stopped.",
        capability="perception",
        task="perception",
        kind=kind,
        options={"A": "Going ahead.", "B": "Stopped."} if kind == "mcq" else None,
        answer="B" if kind == "mcq" else "There is a brown SUV to the back of the ego vehicle.",
    )


def test_the_simple_grader_uses_the_letter_and_word_overlap():
    mcq = _drivelm_like("mcq")
    rubric = RUBRICS[rubric_for(mcq)]
    points = grade(rubric, facts_for(mcq, "B. The SUV behind is stopped.")).points
    assert points["answer"] == 50
    assert grade(rubric, facts_for(mcq, "A. It is going ahead.")).points["answer"] == 0
    open_ = _drivelm_like("open")
    rubric = RUBRICS[rubric_for(open_)]
    exact = grade(rubric, facts_for(open_, open_.answer))
    assert exact.method == "simple"
    assert exact.points["content"] == 20 and exact.points["motion"] == 20
    half = "There is a brown car."  # covers "brown" of {brown, suv, back}
    share = recall(half, open_.answer)
    assert share == pytest.approx(1 / 3)
    assert grade(rubric, facts_for(open_, half)).points["content"] == round(20 * share)


def test_facts_read_back_from_a_prompt_match_the_sample():
    mcq = _drivelm_like("mcq")
    from_text = facts_from_text(ground_truth_text(mcq), "B. Stopped.")
    from_sample = facts_for(mcq, "B. Stopped.")
    assert (from_text.letter, from_text.answer_text) == ("B", "B. Stopped.")
    rubric = RUBRICS["perception_mcq"]
    assert grade(rubric, from_text).points["answer"] == grade(rubric, from_sample).points["answer"] == 50


@pytest.mark.parametrize(
    ("text", "share"),
    [("The car is stopped.", 1.0), ("the car is stopped", 0.7), ("stop stop stop now", 0.3), ("", 0.0)],
)
def test_language_share(text, share):
    assert language_share(text) == share


@pytest.mark.parametrize(
    ("prediction", "share"),
    [
        ("Decelerate gradually without braking.", 1.0),
        ("The ego vehicle should slow down.", 0.5),
        ("Keep going.", 0.0),
        ("", 0.0),
    ],
)
def test_action_share(prediction, share):
    assert action_share(prediction, "decelerate gradually without braking") == share
