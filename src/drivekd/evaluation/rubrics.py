"""Judge rubrics per DriveBench category and the prompt that carries one sample to a judge.

The point structure of each rubric is the published DriveBench one (engineering facts); the wording is Drive-KD's
own. A prompt has fenced sections (question, ground truth, object descriptions, prediction) and ends with a
machine-readable line ``[drivekd-item] {"id": ..., "rubric": ...}``, so the local grader behind
``drivekd judge serve`` can find the sample and grade the same request a hosted judge would see.

Which rubric judges a sample follows DriveBench's ``evaluate/eval.py`` routing as the data side implements it
(:func:`drivekd.data.drivebench.scored_tag` and :func:`~drivekd.data.drivebench.judged`): perception 2 -> perception
VQA, else 0 -> perception MCQ; prediction 3 -> prediction VQA, else 0 -> not judged; planning 1 -> planning VQA;
behavior 0 -> behavior MCQ. A sample with an upstream tag (``meta["drivebench_tag"]``) is routed by it; one without
(synthetic, DriveLM) by the tag its task and kind export to (:func:`~drivekd.data.drivebench.drivebench_tag`:
perception MCQ / open -> 0 / 2, prediction open -> 3, planning -> 1, an MCQ's letter being its action, behavior ->
0), except that its yes/no questions are not judged (they get a yes/no accuracy instead, as DriveBench's yes/no
questions do).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from drivekd.data.drivebench import ROUTES, drivebench_tags, judged, scored_tag
from drivekd.data.qa import TAG_HINT, match_object_info, question_object, tag_prefix
from drivekd.data.schema import Sample
from drivekd.errors import DataError


@dataclass(frozen=True)
class Criterion:
    key: str
    title: str
    points: int
    guide: str


@dataclass(frozen=True)
class Rubric:
    name: str
    title: str
    criteria: tuple[Criterion, ...]

    @property
    def total(self) -> int:
        return sum(c.points for c in self.criteria)


_CHOICE = "{points} when the option letter the answer commits to equals the ground-truth letter, otherwise 0 (no partial credit, whatever the explanation)."
_CLARITY = "A committed answer with a short, readable explanation that supports it."
_LANGUAGE = "Well-formed sentences, no repetition loops, no stray tokens."
_CONCISE = "Says what is asked without padding; much longer than needed loses points."

RUBRICS: dict[str, Rubric] = {
    r.name: r
    for r in (
        Rubric(
            "perception_mcq",
            "Perception, multiple choice",
            (
                Criterion("answer", "Chosen option", 50, _CHOICE.format(points=50)),
                Criterion(
                    "objects",
                    "Object identity",
                    10,
                    "Up to 5 for naming the referenced object(s) correctly, up to 5 for their attributes (category, colour, size).",
                ),
                Criterion(
                    "location",
                    "Position and heading",
                    15,
                    "Where the object is relative to the ego vehicle (camera, side, lane, distance) and which way it faces or moves.",
                ),
                Criterion(
                    "environment",
                    "Scene conditions",
                    15,
                    "Relevant surroundings: traffic lights and signs, road layout, crossings, weather and visibility.",
                ),
                Criterion("clarity", "Clear justification", 10, _CLARITY),
            ),
        ),
        Rubric(
            "perception_vqa",
            "Perception, open question",
            (
                Criterion(
                    "content",
                    "Agreement with the ground truth",
                    20,
                    "The key facts of the ground truth (which objects, what they are, what they do) are stated.",
                ),
                Criterion(
                    "motion", "Object motion", 20, "The movement or state of the referenced objects is right."
                ),
                Criterion(
                    "context",
                    "Scene context",
                    15,
                    "Relevant surroundings (signals, road layout, weather) are taken into account.",
                ),
                Criterion(
                    "awareness",
                    "Spatial awareness",
                    15,
                    "Objects are placed correctly relative to the ego vehicle (camera, side, lane, distance).",
                ),
                Criterion("concision", "Concision", 20, _CONCISE),
                Criterion("grammar", "Language", 10, _LANGUAGE),
            ),
        ),
        Rubric(
            "prediction_vqa",
            "Prediction, open question",
            (
                Criterion(
                    "priority",
                    "Objects to notice, in order",
                    20,
                    "The objects the ground truth says to notice are named, the most important first.",
                ),
                Criterion(
                    "description",
                    "Object descriptions",
                    20,
                    "Category and appearance of each object are right.",
                ),
                Criterion(
                    "state",
                    "Object states",
                    15,
                    "What each object is doing (moving, turning, stopped, crossing).",
                ),
                Criterion(
                    "ego_action",
                    "Ego action per object",
                    15,
                    "The action the ego vehicle should take because of each object matches the ground truth.",
                ),
                Criterion(
                    "logic",
                    "Reasoning chain",
                    20,
                    "The answer links each object's state to the ego action as the ground truth does.",
                ),
                Criterion("grammar", "Language", 10, _LANGUAGE),
            ),
        ),
        Rubric(
            "planning_vqa",
            "Planning, open question",
            (
                Criterion(
                    "action",
                    "Recommended action",
                    40,
                    "The action(s) match the ground truth; partial credit for the right kind of manoeuvre with a wrong detail; 0 for an unsafe or opposite action. For a multiple-choice question, the chosen option decides.",
                ),
                Criterion(
                    "reasoning",
                    "Reason for the action",
                    20,
                    "The reason matches the ground truth (the object, rule or hazard behind the action).",
                ),
                Criterion(
                    "probability",
                    "Likelihood or confidence",
                    15,
                    "A stated probability or confidence level that matches the ground truth's.",
                ),
                Criterion(
                    "safety",
                    "Safety and context",
                    15,
                    "Awareness of the hazards and scene conditions that make the action safe.",
                ),
                Criterion("concision", "Concision", 10, _CONCISE),
            ),
        ),
        Rubric(
            "behavior_mcq",
            "Ego behaviour, multiple choice",
            (
                Criterion("answer", "Chosen option", 50, _CHOICE.format(points=50)),
                Criterion(
                    "behavior",
                    "Ego motion described",
                    15,
                    "Steering direction and speed of the ego vehicle are stated correctly.",
                ),
                Criterion(
                    "evidence",
                    "Evidence for the behaviour",
                    15,
                    "Visual cues that support the choice (lane lines, relative motion of the scene).",
                ),
                Criterion(
                    "context",
                    "Scene context",
                    10,
                    "Road layout, traffic and conditions relevant to the behaviour.",
                ),
                Criterion("clarity", "Clarity and language", 10, _CLARITY),
            ),
        ),
    )
}

# The rubric of each judged DriveBench route (task, scored tag): every route of ``ROUTES`` but prediction 0.
ROUTE_RUBRICS: dict[tuple[str, int], str] = {
    ("perception", 2): "perception_vqa",
    ("perception", 0): "perception_mcq",
    ("prediction", 3): "prediction_vqa",
    ("planning", 1): "planning_vqa",
    ("behavior", 0): "behavior_mcq",
}
NOT_JUDGED_REASON = "prediction yes/no, as upstream"


def rubric_for(sample: Sample) -> str | None:
    """The rubric that judges ``sample``, or ``None`` when it is not judged (see the module docstring).

    A sample whose upstream tag has no route is an error, as the importer and upstream's scorer refuse it.
    """
    tags = drivebench_tags(sample)
    if tags is None and sample.kind == "yes/no":
        return None
    if scored_tag(sample) is None:
        expected = " or ".join(f"[{t}]" for t in ROUTES[sample.task])
        raise DataError(
            f"sample {sample.id}",
            None,
            "meta.drivebench_tag",
            f"DriveBench scores no {sample.task} sample with tag {tags}",
            hint=f"a {sample.task} sample has tag {expected}",
        )
    return ROUTE_RUBRICS[sample.task, scored_tag(sample)] if judged(sample) else None


def ground_truth_text(sample: Sample) -> str:
    """The reference answer as the judge sees it: an MCQ letter with its option text, then the rationale."""
    answer = sample.answer
    if sample.kind == "mcq" and sample.options and answer in sample.options:
        answer = f"{answer}. {sample.options[answer]}"
    return answer if not sample.rationale else f"{answer}\nExplanation: {sample.rationale}"


def describe_objects(sample: Sample) -> str:
    """Ground-truth descriptions of the referenced objects (DriveLM object infos or the synthetic ground truth)."""
    lines = []
    for tag, info in sample.meta.get("object_infos", {}).items():
        facts = [str(info[k]) for k in ("Category", "Status", "Visual_description") if info.get(k)]
        lines.append(f"{tag}: {', '.join(facts)}")
    for obj in sample.meta.get("gt", {}).get("objects", []):
        where = f"{obj['relation']}, {obj['distance_m']} m along the road, seen by {obj['camera']}"
        lines.append(
            f"<{obj['tag_id']},{obj['camera']},{obj['x']:.4f},{obj['y']:.4f}>: {obj['colour']} {obj['category']}, "
            f"{obj['motion']}, {where}"
        )
    return "\n".join(lines) if lines else "Not available."


def visual_description(sample: Sample, fixed: dict[str, str] | None = None) -> str | None:
    """The ground-truth description DriveBench gives its judge: that of the question's first object
    (:func:`~drivekd.data.qa.question_object`), matched in ``meta["object_infos"]`` by its ``<cK,CAM`` prefix
    (:func:`~drivekd.data.qa.match_object_info`, the importers' matching) and lower-cased as upstream; ``None``
    when the question names no object. A question in ``fixed`` gets that sentence instead.

    Raises ``KeyError`` naming the prefix when no object matches (upstream raises too).
    """
    if fixed and sample.question in fixed:
        return fixed[sample.question]
    try:
        obj = question_object(sample.question)
    except ValueError as err:
        raise DataError(f"sample {sample.id}", None, "question", str(err), hint=TAG_HINT) from None
    if obj is None:
        return None
    info = match_object_info(obj, sample.meta.get("object_infos") or {})
    if info is None:
        raise KeyError(tag_prefix(obj))
    return str(info.get("Visual_description", "")).lower()


SYSTEM_PROMPT = (
    "You grade the answers of a driving assistant against a reference answer. Apply the rubric strictly: give a "
    "criterion its full points only when it is fully met, and no points for content that contradicts the reference. "
    "Reply with one line per criterion, '<number>. <criterion> (<maximum> points): <points>', then the line "
    "'Total Score: <sum>', then one sentence explaining the grade."
)
REASK = (
    "Your reply has no line 'Total Score: <number>' with a number from 0 to 100. Reply again with one line per "
    "criterion and the line 'Total Score: <sum>'."
)
_FENCE = "-----"
_SECTIONS = ("QUESTION", "GROUND TRUTH", "REFERENCED OBJECTS", "PREDICTION")
_END = f"{_FENCE} END {_FENCE}"
_ITEM = "[drivekd-item]"
_ITEM_RE = re.compile(r"^\[drivekd-item\] (\{.*\})\s*$", re.MULTILINE)


def rubric_text(rubric: Rubric) -> str:
    lines = [f"Rubric: {rubric.title} ({rubric.total} points)"]
    for k, c in enumerate(rubric.criteria, start=1):
        lines.append(f"{k}. {c.title} ({c.points} points): {c.guide}")
    return "\n".join(lines)


def build_judge_messages(
    rubric: Rubric, *, sample_id: str, question: str, ground_truth: str, objects: str, prediction: str
) -> list[dict[str, str]]:
    """Chat messages asking a judge to grade one prediction with ``rubric``."""
    sections = dict(zip(_SECTIONS, (question, ground_truth, objects, prediction), strict=True))
    body = "\n".join(f"{_FENCE} {name} {_FENCE}\n{text}" for name, text in sections.items())
    item = json.dumps({"id": sample_id, "rubric": rubric.name})
    user = f"{rubric_text(rubric)}\n\n{body}\n{_END}\n\n{_ITEM} {item}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class JudgeRequest:
    """What a grader reads back from a prompt built by :func:`build_judge_messages`."""

    sample_id: str
    rubric: Rubric
    question: str
    ground_truth: str
    objects: str
    prediction: str


def _between(text: str, start: str, end: str, *, last_end: bool = False) -> str:
    head = text.index(start) + len(start)
    stop = text.rindex(end) if last_end else text.index(end, head)
    return text[head:stop].strip("\n")


def parse_judge_request(messages: list[dict[str, Any]]) -> JudgeRequest | None:
    """The graded item of a chat request (the first user message with an item line), or ``None``."""
    for message in messages:
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, str) or _ITEM not in content:
            continue
        # The item line follows the last END fence, so a prediction cannot forge one.
        match = _ITEM_RE.search(content, content.rfind(_END) + 1)
        if match is None:
            return None
        try:
            item = json.loads(match.group(1))
            rubric = RUBRICS[item["rubric"]]
            fences = [f"{_FENCE} {name} {_FENCE}\n" for name in _SECTIONS]
            question, truth, objects = (_between(content, fences[k], f"\n{fences[k + 1]}") for k in range(3))
            prediction = _between(content, fences[3], f"\n{_END}", last_end=True)
        except (ValueError, KeyError, TypeError):
            return None
        return JudgeRequest(str(item["id"]), rubric, question, truth, objects, prediction)
    return None


def format_grade(rubric: Rubric, points: dict[str, int]) -> str:
    """A judge-style reply: one line per criterion and the total (what the local grader answers)."""
    lines = [
        f"{k}. {c.title} ({c.points} points): {points[c.key]}" for k, c in enumerate(rubric.criteria, start=1)
    ]
    lines.append(f"Total Score: {sum(points[c.key] for c in rubric.criteria)}")
    return "\n".join(lines)
