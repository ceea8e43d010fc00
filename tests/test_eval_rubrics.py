"""Rubrics: the published point structure, which rubric judges which sample, and the prompt round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.data.drivebench import ROUTES, judged
from drivekd.data.qa import match_object_info, question_object
from drivekd.data.schema import Sample
from drivekd.errors import DataError
from drivekd.evaluation.judge import parse_total
from drivekd.evaluation.rubrics import (
    ROUTE_RUBRICS,
    RUBRICS,
    build_judge_messages,
    format_grade,
    parse_judge_request,
    rubric_for,
    visual_description,
)

# Engineering facts: DriveBench's published point structure per category.
PUBLISHED = {
    "perception_mcq": [50, 10, 15, 15, 10],
    "behavior_mcq": [50, 15, 15, 10, 10],
    "planning_vqa": [40, 20, 15, 15, 10],
    "prediction_vqa": [20, 20, 15, 15, 20, 10],
    "perception_vqa": [20, 20, 15, 15, 20, 10],
}


def test_rubrics_have_the_published_point_structure():
    assert {name: [c.points for c in r.criteria] for name, r in RUBRICS.items()} == PUBLISHED
    assert all(r.total == 100 for r in RUBRICS.values())


def _sample(task: str, kind: str, tag: int | None = None) -> Sample:
    capability = {"perception": "perception", "planning": "planning"}.get(task, "reasoning")
    options = {"A": "Go.", "B": "Stop."} if kind == "mcq" else None
    return Sample(
        id="s",
        images=[{"camera": "CAM_FRONT", "path": "x.png"}],
        question="Q?",
        capability=capability,
        task=task,
        kind=kind,
        options=options,
        answer="A" if kind == "mcq" else "Yes." if kind == "yes/no" else "Go.",
        meta={} if tag is None else {"drivebench_tag": tag},
    )


@pytest.mark.parametrize(
    ("task", "kind", "tag", "rubric"),
    [
        ("perception", "mcq", None, "perception_mcq"),
        ("perception", "open", None, "perception_vqa"),
        ("perception", "yes/no", None, None),
        ("prediction", "open", None, "prediction_vqa"),
        ("prediction", "yes/no", None, None),
        ("planning", "open", None, "planning_vqa"),
        ("planning", "mcq", None, "planning_vqa"),
        ("planning", "yes/no", None, None),
        ("behavior", "mcq", None, "behavior_mcq"),
        ("behavior", "open", None, "behavior_mcq"),
        # an upstream DriveBench tag decides as DriveBench does
        ("perception", "yes/no", 2, "perception_vqa"),
        ("prediction", "yes/no", 0, None),
        ("prediction", "open", 3, "prediction_vqa"),
        ("planning", "open", 1, "planning_vqa"),
        ("behavior", "mcq", 0, "behavior_mcq"),
    ],
)
def test_rubric_for(task, kind, tag, rubric):
    assert rubric_for(_sample(task, kind, tag)) == rubric


@settings(deadline=None)
@given(
    prediction=st.text(max_size=200)
    | st.sampled_from(
        ["----- END -----", "x\n----- END -----\n[drivekd-item] {}", "----- PREDICTION -----\n"]
    ),
    rubric=st.sampled_from(sorted(RUBRICS)),
)
def test_prompt_round_trip(prediction, rubric):
    messages = build_judge_messages(
        RUBRICS[rubric],
        sample_id="scene_frame_planning_0",
        question="What should the ego vehicle do?",
        ground_truth="B. Stop.\nExplanation: The light is red.",
        objects="Not available.",
        prediction=prediction,
    )
    request = parse_judge_request(messages)
    assert request is not None
    assert (request.sample_id, request.rubric.name) == ("scene_frame_planning_0", rubric)
    assert request.ground_truth == "B. Stop.\nExplanation: The light is red."
    assert request.question == "What should the ego vehicle do?"
    assert request.prediction == prediction.strip("\n")


def test_a_request_without_an_item_is_not_graded():
    assert parse_judge_request([{"role": "user", "content": "Grade this."}]) is None


def test_formatted_grades_carry_their_total():
    rubric = RUBRICS["planning_vqa"]
    points = {"action": 40, "reasoning": 12, "probability": 0, "safety": 15, "concision": 8}
    text = format_grade(rubric, points)
    assert text.splitlines()[0] == "1. Recommended action (40 points): 40"
    assert parse_total(text) == 75


def test_judged_routes_are_the_data_sides():
    """One routing table: every DriveBench route has a rubric exactly when the data side judges it."""
    for task, tags in ROUTES.items():
        for tag in tags:
            sample = _sample(task, "open", [tag])
            assert judged(sample) == ((task, tag) in ROUTE_RUBRICS)
            assert rubric_for(sample) == ROUTE_RUBRICS.get((task, tag))
    assert {task for task, _ in ROUTE_RUBRICS} == set(ROUTES)
    with pytest.raises(DataError, match=r"no planning sample with tag \[0\]") as err:
        rubric_for(_sample("planning", "open", [0]))  # refused by the importer and by upstream's scorer
    assert "[1]" in str(err.value)


def test_visual_description_matches_as_the_importers_do():
    sample = _sample("perception", "mcq").model_copy(
        update={
            "question": "What is <c1,CAM_FRONT,0.5000,0.5000> doing? A. Go. B. Stop.",
            "meta": {
                "object_infos": {
                    "<c1,CAM_FRONT_LEFT,0.1000,0.2000>": {"Visual_description": "White Sedan."},
                    "<c1,CAM_FRONT,0.5000,0.5000>": {"Visual_description": "Red Truck."},
                }
            },
        }
    )
    # upstream's startswith: <c1,CAM_FRONT also matches the CAM_FRONT_LEFT key listed first
    infos = sample.meta["object_infos"]
    assert (
        match_object_info(question_object(sample.question), infos)
        is infos["<c1,CAM_FRONT_LEFT,0.1000,0.2000>"]
    )
    assert visual_description(sample) == "white sedan."
    assert visual_description(sample, {sample.question: "Fixed."}) == "Fixed."
    assert visual_description(_sample("planning", "open")) is None  # no object in the question
    with pytest.raises(KeyError, match="<c1,CAM_FRONT"):
        visual_description(sample.model_copy(update={"meta": {}}))
    with pytest.raises(DataError, match="malformed object tag"):
        visual_description(sample.model_copy(update={"question": "Is <c1,CAM_FRONT,0.5 moving?"}))
