"""A deterministic grader that awards rubric points without a language model.

For synthetic samples (structured ground truth in ``meta["gt"]``) every criterion is checked against the stored
facts: the option letter (strict extraction), object category and colour, camera and lane relation, motion,
the recommended action, probability level, scene facts (weather, traffic light, intersection, crosswalk, stop
sign), the ego vehicle's steering and speed. A criterion whose facts a question does not have (for example a
probability for a collision question) is scored by how much of the reference rationale the answer covers.

Samples without structured ground truth (DriveLM, DriveBench) get the simple grader: the option letter where the
rubric has one, and every other content criterion scaled by the share of the reference answer's content words
the prediction contains; concision, clarity and language use the same text checks as above. It is a pipeline
check, not a substitute for an LLM judge.

Points are whole numbers; each criterion's share is rounded to the nearest point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from drivekd.data.cameras import CAMERA_LABELS
from drivekd.data.schema import Sample
from drivekd.evaluation.choices import extract_choice
from drivekd.evaluation.rubrics import Rubric

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = (
    "a an the is are was were be been of to in on at by for with and or so that this it its as from into there "
    "these those which what why how should could would will can do does did not no yes has have had than then "
    "ego vehicle object objects c1 c2 c3 c4 cam"
)
_STOP = frozenset(_STOP_WORDS.split())
STYLE_CRITERIA = frozenset({"concision", "clarity", "grammar"})
# Key phrases that carry an action when its full wording is not there.
_ACTION_WORDS = {
    "brake gently to a stop": ("stop", "brake"),
    "remain stationary": ("stationary", "stay stopped", "wait"),
    "decelerate gradually without braking": ("decelerate", "slow down"),
    "slightly offset to the left": ("offset to the left", "offset left", "move left"),
    "keep going at the same speed": ("keep going", "same speed", "maintain"),
}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("_", " "))


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in _STOP}


def recall(prediction: str, reference: str) -> float:
    """Share of the reference's content words that the prediction contains (1 when the reference has none)."""
    ref = content_words(reference)
    return len(ref & content_words(prediction)) / len(ref) if ref else 1.0


def mentions(prediction: str, phrase: str) -> bool:
    """``phrase`` appears in ``prediction`` as whole words (case, underscores and hyphens ignored)."""
    wanted = " ".join(words(phrase.replace("-", " ")))
    return bool(wanted) and f" {wanted} " in f" {' '.join(words(prediction.replace('-', ' ')))} "


def language_share(prediction: str) -> float:
    """1 for well-formed text, less for repetition loops, stray symbols or a missing sentence end; 0 if empty."""
    tokens = words(prediction)
    if not tokens:
        return 0.0
    odd = sum(not (ch.isascii() and (ch.isprintable() or ch.isspace())) for ch in prediction) / len(
        prediction
    )
    if odd > 0.1:
        return 0.0
    looping = len(tokens) >= 8 and len(set(tokens)) / len(tokens) < 0.4
    stuttering = any(tokens[k] == tokens[k + 1] == tokens[k + 2] for k in range(len(tokens) - 2))
    if looping or stuttering:
        return 0.3
    return 1.0 if prediction.rstrip()[-1] in ".!?" else 0.7


def concision_share(prediction: str, reference: str) -> float:
    """1 up to three times the reference's length (counted as at least 10 words), half up to six times, else 0."""
    n = len(words(prediction))
    if n == 0:
        return 0.0
    budget = max(len(words(reference)), 10)
    return 1.0 if n <= 3 * budget else 0.5 if n <= 6 * budget else 0.0


def clarity_share(prediction: str) -> float:
    """Half for committing to one option, half for a readable explanation of at least five words."""
    committed = extract_choice(prediction, "strict") is not None
    explained = len(words(prediction)) >= 6 and language_share(prediction) == 1.0
    return 0.5 * committed + 0.5 * explained


def action_share(prediction: str, action: str) -> float:
    """1 for the action phrase, 0.5 when one of its key phrases appears, 0 otherwise."""
    if mentions(prediction, action):
        return 1.0
    return 0.5 if any(mentions(prediction, k) for k in _ACTION_WORDS.get(action, ())) else 0.0


def _mean(values: Iterable[float], default: float) -> float:
    values = list(values)
    return sum(values) / len(values) if values else default


@dataclass
class Facts:
    """What one sample lets a grader check; ``letter`` is the ground-truth option of an MCQ."""

    prediction: str
    answer_text: str
    rationale: str
    letter: str | None = None
    gt: dict[str, Any] = field(default_factory=dict)

    @property
    def objects(self) -> list[dict[str, Any]]:
        return list(self.gt.get("objects", []))

    @property
    def chosen_right(self) -> float:
        return float(self.letter is not None and extract_choice(self.prediction, "strict") == self.letter)

    @property
    def fallback(self) -> float:
        """The rationale-coverage score used where a criterion has no facts to check."""
        return recall(self.prediction, self.rationale or self.answer_text)

    def environment(self) -> float:
        env = self.gt.get("environment")
        if not env:
            return self.fallback
        phrases = [env["weather"]]
        if env.get("traffic_light"):
            phrases.append(f"{env['traffic_light']} light")
        phrases += [name for name in ("intersection", "crosswalk") if env.get(name)]
        if env.get("stop_sign"):
            phrases.append("stop sign")
        return _mean((mentions(self.prediction, p) for p in phrases), 0.0)

    def identity(self) -> float:
        return _mean(
            (
                0.5 * mentions(self.prediction, o["category"]) + 0.5 * mentions(self.prediction, o["colour"])
                for o in self.objects
            ),
            recall(self.prediction, self.answer_text),
        )

    def location(self) -> float:
        def one(o: dict[str, Any]) -> float:
            camera = mentions(self.prediction, o["camera"]) or mentions(
                self.prediction, CAMERA_LABELS[o["camera"]]
            )
            return 0.5 * camera + 0.5 * recall(self.prediction, o["relation"])

        return _mean(map(one, self.objects), self.fallback)

    def motion(self) -> float:
        moving = [o for o in self.objects if o["motion"] != "static"]
        return _mean((float(mentions(self.prediction, o["motion"])) for o in moving), self.fallback)

    def object_actions(self) -> float:
        return _mean((action_share(self.prediction, o["action"]) for o in self.objects), self.fallback)

    def priority(self) -> float:
        """Half for naming every object (by tag or description), half for naming the first one first."""
        if not self.objects:
            return self.fallback
        text = self.prediction.lower()

        def position(o: dict[str, Any]) -> int | None:
            names = (
                f"<{o['tag_id']},",
                f"{o['colour']} {o['category']}",
                f"{o['category']} in {o['colour']}",
            )
            spots = [text.find(name.lower()) for name in names]
            spots = [s for s in spots if s >= 0]
            return min(spots) if spots else None

        places = [position(o) for o in self.objects]
        named = [p for p in places if p is not None]
        first = places[0] is not None and places[0] == min(named)
        return 0.5 * len(named) / len(places) + 0.5 * first

    def planned_action(self) -> float:
        if self.letter is not None:
            return self.chosen_right
        target = self.gt.get("target", {})
        if "action" in target:
            return action_share(self.prediction, target["action"])
        wanted = target.get("safe") or target.get("collision_actions")
        if isinstance(wanted, list) and wanted:
            covered = _mean((action_share(self.prediction, a) for a in wanted), 0.0)
            risky = any(mentions(self.prediction, a) for a in self.gt.get("risky_actions", []))
            return covered * (0.5 if risky and "safe" in target else 1.0)
        if "collision_actions" in target:  # nothing would collide
            return float(mentions(self.prediction, "no") and mentions(self.prediction, "collision"))
        return self.fallback

    def probability(self) -> float:
        level = self.gt.get("target", {}).get("probability")
        return float(mentions(self.prediction, level)) if level else self.fallback

    def behaviour(self) -> float:
        ego = self.gt.get("ego")
        if not ego:
            return self.fallback
        return 0.5 * mentions(self.prediction, ego["steer"]) + 0.5 * mentions(self.prediction, ego["speed"])

    def reason(self) -> float:
        reasons = [o["reason"] for o in self.objects] or [self.gt.get("reason", "")]
        return max(recall(self.prediction, r) for r in reasons) if any(reasons) else self.fallback


def _content(f: Facts) -> float:
    return 0.5 * f.identity() + 0.5 * recall(f.prediction, f.answer_text)


# criterion key -> share of its points, for structured ground truth
_STRUCTURED: dict[str, Callable[[Facts], float]] = {
    "answer": lambda f: f.chosen_right,
    "objects": Facts.identity,
    "location": Facts.location,
    "environment": Facts.environment,
    "context": Facts.environment,
    "clarity": lambda f: clarity_share(f.prediction),
    "behavior": Facts.behaviour,
    "evidence": lambda f: f.fallback,
    "content": _content,
    "action": Facts.planned_action,
    "reasoning": Facts.reason,
    "probability": Facts.probability,
    "safety": lambda f: 0.5 * f.environment() + 0.5 * f.reason(),
    "concision": lambda f: concision_share(f.prediction, f.answer_text),
    "priority": Facts.priority,
    "description": Facts.identity,
    "state": Facts.motion,
    "motion": Facts.motion,
    "ego_action": Facts.object_actions,
    "logic": lambda f: recall(f.prediction, f.answer_text),
    "awareness": Facts.location,
    "grammar": lambda f: language_share(f.prediction),
}


def _simple(key: str, facts: Facts) -> float:
    if key == "answer" or (key == "action" and facts.letter is not None):
        return facts.chosen_right
    if key in ("concision", "clarity", "grammar"):
        return _STRUCTURED[key](facts)
    return recall(facts.prediction, facts.answer_text)


@dataclass(frozen=True)
class Grade:
    """Points per criterion key; ``method`` is "structured" or "simple"."""

    points: dict[str, int]
    method: str

    @property
    def total(self) -> int:
        return sum(self.points.values())


def has_structured_gt(gt: dict[str, Any]) -> bool:
    """Synthetic driving samples carry the scene facts this grader checks (general-domain ones do not)."""
    return "environment" in gt


def facts_for(sample: Sample, prediction: str) -> Facts:
    """The facts of a Drive-KD sample: its letter and option text for an MCQ, its rationale and structured gt."""
    mcq = sample.kind == "mcq" and sample.options is not None
    return Facts(
        prediction=prediction,
        answer_text=sample.options[sample.answer] if mcq else sample.answer,  # type: ignore[index]
        rationale=sample.rationale or "",
        letter=sample.answer if mcq else None,
        gt=sample.meta.get("gt", {}),
    )


def facts_from_text(ground_truth: str, prediction: str) -> Facts:
    """Facts read back from a judge prompt's ground-truth section (no sample at hand): a leading option letter
    ("B. Stopped.") makes it an MCQ; "Explanation:" separates the rationale."""
    answer, _, rationale = ground_truth.partition("\nExplanation: ")
    letter = extract_choice(answer, "strict")
    return Facts(prediction, answer, rationale, letter)


def grade(rubric: Rubric, facts: Facts) -> Grade:
    """Award each criterion of ``rubric`` its share of points (structured when ``facts.gt`` has scene facts).

    Style criteria (concision, clarity, language) earn points only when some content criterion does: an empty or
    off-topic answer gets nothing for being short and well-formed.
    """
    structured = has_structured_gt(facts.gt)
    shares = {
        c.key: min(max(_STRUCTURED[c.key](facts) if structured else _simple(c.key, facts), 0.0), 1.0)
        for c in rubric.criteria
    }
    if not any(share for key, share in shares.items() if key not in STYLE_CRITERIA):
        shares = dict.fromkeys(shares, 0.0)
    points = {c.key: round(c.points * shares[c.key]) for c in rubric.criteria}
    return Grade(points, "structured" if structured else "simple")
