"""Questions of the paper's eight types, short answers and grounded rationales about a rendered scene.

Answers come from :mod:`drivekd.data.synthetic.rules`; everything a grader needs is stored as plain JSON in
``QA.gt``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drivekd.data.cameras import CAMERAS
from drivekd.data.schema import OPTION_LETTERS
from drivekd.data.synthetic.rules import (
    GROUP_ACTION,
    STATIONARY,
    SceneViews,
    _cap,
    _describe,
    _join,
    _rule_of,
    _view_label,
    _zone,
    article,
    collisions,
    decide,
    describe,
    object_plan,
    relation,
    where,
)
from drivekd.data.synthetic.scene import (
    CLOTHES_COLOURS,
    LIGHT_STATES,
    PEDESTRIAN_MOTIONS,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SPEEDS,
    STEERS,
    VEHICLE_COLOURS,
    VEHICLE_MOTIONS,
    VEHICLE_SIZES,
    Scene,
    SceneObject,
    ShapeScene,
)
from drivekd.data.tags import ObjectTag

QUESTION_TYPES: dict[str, str] = {  # question type -> DriveBench task
    "moving_status": "perception",
    "target_identification": "perception",
    "multi_view_object_extraction": "perception",
    "attention_based_reasoning": "prediction",
    "ego_behavior": "behavior",
    "rationale_grounded_planning": "planning",
    "safe_action_set": "planning",
    "collision_inducing_actions": "planning",
}
GENERAL_TYPES = ("general_count", "general_colour", "general_shape", "general_presence")

ACTIONS = (
    *GROUP_ACTION.values(),
    STATIONARY,
    "slightly offset to the right",
    "change lanes to the left",
    "change lanes to the right",
    "accelerate and go straight",
    "back up",
    "brake suddenly",
    "turn left sharply",
    "turn right sharply",
)
NO_COLLISION = "No such action will lead to a collision."
RULE_EXPLANATION = {
    "red_light": "a red light requires the ego vehicle to stop before the stop line",
    "yellow_light": "a yellow light is about to turn red, so the ego vehicle should slow down early",
    "green_light": "a green light lets the ego vehicle proceed through the junction",
    "pedestrian_in_path": "a pedestrian on the road ahead has the right of way",
    "stop_sign": "a stop sign requires a full stop at the stop line",
    "vehicle_stopped_close": "a stopped vehicle this close ahead in the ego lane leaves no room to go on",
    "vehicle_stopped_ahead": "a stopped vehicle ahead in the ego lane must be approached slowly",
    "vehicle_turning_ahead": "a vehicle turning ahead in the ego lane slows down and blocks the lane",
    "vehicle_too_close": "the gap to the vehicle ahead in the ego lane is too short",
    "obstacle_right_edge": "it narrows the ego lane on the right, so the ego vehicle should keep clear of it",
    "clear_road": "nothing blocks the ego lane ahead",
}
MOTION_CUES = {
    "going ahead": "a cyan arrow above it points up, so it is going ahead",
    "turn left": "an orange arrow above it points left, so it turns left",
    "turn right": "a magenta arrow above it points right, so it turns right",
    "stopped": "a red bar above it shows its brakes are on, so it is stopped",
    "crossing the road": "a green arrow above it points across, so it is crossing the road",
    "standing still": "no marker is above it, so it is standing still",
    "walking along the road": "a green arrow above it points along the road, so it is walking along the road",
}
MOTION_OPTIONS = {  # every motion of the road user's kind (a pedestrian's fourth option is never true)
    "vehicle": VEHICLE_MOTIONS,
    "pedestrian": ("riding a bicycle", *PEDESTRIAN_MOTIONS),
}
SHAPE_CUES = {
    "sedan": "low body with a glass cabin",
    "van": "tall box body with a window strip",
    "truck": "tall cargo box and a separate cab",
    "bus": "long body with a row of windows",
    "pedestrian": "upright human figure",
    "cyclist": "rider on two wheels",
    "traffic light": "three-lamp housing on a pole",
    "stop sign": "red octagon on a pole",
}
STEER_CUES = {
    "going straight": "the ego arrow points straight up",
    "slightly steering to the left": "the ego arrow leans slightly left",
    "slightly steering to the right": "the ego arrow leans slightly right",
    "steering to the left": "the ego arrow leans well left",
    "steering to the right": "the ego arrow leans well right",
}
SPEED_CUES = {
    "not moving": "a red square replaces the ego arrow",
    "driving slowly": "the ego arrow is short and green",
    "driving with normal speed": "the ego arrow is medium and orange",
    "driving fast": "the ego arrow is long and magenta",
}
ORDINALS = ("first", "second", "third")


@dataclass(frozen=True)
class QA:
    question_type: str
    kind: str  # "mcq" | "open" | "yes/no"
    question: str
    answer: str
    rationale: str
    options: dict[str, str] | None
    objects: list[ObjectTag]
    gt: dict[str, Any]


# --- helpers for building questions ---
def _options(rng: random.Random, correct: str, distractors: Sequence[str]) -> tuple[dict[str, str], str]:
    """Lettered options in a random order and the correct letter: every letter is equally likely to be right,
    so neither the letter nor the options' order tells the answer without the images."""
    texts = [correct, *distractors]
    rng.shuffle(texts)
    options = dict(zip(OPTION_LETTERS, texts, strict=False))
    return options, next(k for k, v in options.items() if v == correct)


def _with_options(question: str, options: dict[str, str]) -> str:
    listed = " ".join(f"{k}. {v}" for k, v in options.items())
    return f"{question} Please select the correct answer from the following options: {listed}"


def _sentence(text: str) -> str:
    return _cap(text) + "."


class _Asker:
    """Builds the eight driving question types for one scene seen through one set of views."""

    def __init__(self, scene: Scene, views: SceneViews, rng: random.Random) -> None:
        self.scene, self.views, self.rng = scene, views, rng
        self.decision = decide(scene, views)
        self.visible = [o for o in scene.objects if o.id in views.placements]

    # --- gt ---
    def _object_gt(self, obj: SceneObject, tag: ObjectTag) -> dict[str, Any]:
        action, reason, probability = object_plan(self.scene, obj, self.decision)
        return {
            "tag_id": tag.id,
            "object_id": obj.id,
            "category": obj.category,
            "colour": obj.colour,
            "motion": obj.motion,
            "camera": tag.camera,
            "x": tag.x,
            "y": tag.y,
            "distance_m": round(obj.x, 1),
            "lateral_m": round(obj.y - self.scene.ego.y, 1),
            "relation": relation(self.scene, obj),
            "is_trigger": obj.id == self.decision.trigger,
            "action": action,
            "reason": reason,
            "probability": probability,
            "collision_actions": list(collisions(self.scene, obj)[0]),
        }

    def _qa(
        self,
        qtype: str,
        kind: str,
        question: str,
        answer: str,
        rationale: str,
        *,
        refs: Sequence[SceneObject] = (),
        options: dict[str, str] | None = None,
        **target: Any,
    ) -> QA:
        tags = [self.views.tag(o.id, k) for k, o in enumerate(refs, start=1)]
        question = question.format(*tags)
        d, scene = self.decision, self.scene
        lights = [o.colour for o in self.visible if o.category == "traffic light"]
        gt = {
            "question_type": qtype,
            "views": self.views.kind,
            "rule": d.rule,
            "ego_action": d.action,
            "trigger": d.trigger,
            "reason": d.reason,
            "probability": d.probability,
            "safe_actions": list(d.safe),
            "risky_actions": list(d.risky),
            "ego": {"steer": scene.ego.steer, "speed": scene.ego.speed},
            "environment": {
                "weather": scene.weather,
                "traffic_light": lights[0] if lights else None,
                "intersection": scene.road.intersection_x is not None,
                "crosswalk": scene.road.crosswalk_x is not None,
                "stop_sign": any(o.category == "stop sign" for o in self.visible),
            },
            "objects": [self._object_gt(o, t) for o, t in zip(refs, tags, strict=True)],
            "answer_text": options[answer] if options else answer,
            "target": target,
        }
        return QA(
            qtype, kind, question, answer, f"{rationale} {_context(gt['environment'])}", options, tags, gt
        )

    def _locate(self, obj: SceneObject, label: str = "c1") -> str:
        cam = _view_label(self.views.camera(obj.id))
        place = f"{relation(self.scene, obj)}, {where(obj)} in the {cam} view"
        return f"{_cap(article(describe(obj)))} ({label}) is {place}"

    def _pick(self, candidates: Sequence[SceneObject], preferred: Sequence[SceneObject] = ()) -> SceneObject:
        pool = preferred if preferred and self.rng.random() < 0.6 else candidates
        return self.rng.choice(list(pool))

    def _ranked(self) -> list[SceneObject]:
        """Visible objects by importance: the trigger, other rule-firing objects, traffic controls, road users
        on a path the ego vehicle could take, the rest; nearer first within a rank."""

        def key(o: SceneObject) -> tuple[int, float]:
            if o.id == self.decision.trigger:
                rank = 0
            elif (r := _rule_of(self.scene, o)) is not None and r[1] != "keep":
                rank = 1
            elif not o.is_road_user:
                rank = 2
            else:
                rank = 3 if collisions(self.scene, o)[0] else 4
            return rank, math.hypot(o.x, o.y - self.scene.ego.y)

        return sorted(self.visible, key=key)

    # --- perception ---
    def moving_status(self) -> QA | None:
        movers = [o for o in self.visible if o.is_road_user]
        if not movers:
            return None
        motions = sorted({o.motion for o in movers})
        motion = self.rng.choice(motions)
        obj = self.rng.choice([o for o in movers if o.motion == motion])
        family = "pedestrian" if obj.category == "pedestrian" else "vehicle"
        texts = {m: _sentence(m) for m in MOTION_OPTIONS[family]}
        options, letter = _options(
            self.rng, texts[obj.motion], [t for m, t in texts.items() if m != obj.motion]
        )
        question = _with_options("What is the moving status of object {0}?", options)
        rationale = f"{self._locate(obj)}. {_sentence(MOTION_CUES[obj.motion])}"
        return self._qa(
            "moving_status",
            "mcq",
            question,
            letter,
            rationale,
            refs=[obj],
            options=options,
            motion=obj.motion,
        )

    def target_identification(self) -> QA | None:
        if not self.visible:
            return None
        obj = self.rng.choice(self.visible)
        desc = describe(obj)
        rationale = (
            f"{self._locate(obj)}; its {SHAPE_CUES[obj.category]} and {obj.colour} colour identify it as "
            f"{article(desc)}."
        )
        if obj.is_road_user:
            rationale += f" Motion: {obj.motion}."
        kind = self.rng.choice(("open", "mcq", "yes/no"))
        if kind == "open":
            return self._qa(
                "target_identification",
                "open",
                "What is the object {0}? Describe its category and colour.",
                _sentence(article(desc)),
                rationale,
                refs=[obj],
                category=obj.category,
                colour=obj.colour,
            )
        if kind == "mcq":
            wrong = _similar_descriptions(self.rng, obj)
            options, letter = _options(
                self.rng, _sentence(article(desc)), [_sentence(article(w)) for w in wrong]
            )
            question = _with_options("What is the object {0}?", options)
            return self._qa(
                "target_identification",
                "mcq",
                question,
                letter,
                rationale,
                refs=[obj],
                options=options,
                category=obj.category,
                colour=obj.colour,
            )
        asked = obj.category if self.rng.random() < 0.5 else _other_category(self.rng, obj.category)
        answer = "Yes." if asked == obj.category else "No."
        return self._qa(
            "target_identification",
            "yes/no",
            f"Is {{0}} {article(asked)}?",
            answer,
            rationale,
            refs=[obj],
            category=obj.category,
            colour=obj.colour,
            asked_category=asked,
        )

    def multi_view_object_extraction(self) -> QA | None:
        if not self.visible:
            return None
        present = {describe(o) for o in self.scene.objects}
        if self.rng.random() < 0.5:
            ranked = self._ranked()[:4]
            parts = [
                f"{article(describe(o))} to the {_view_label(self.views.camera(o.id))} of the ego vehicle"
                for o in ranked
            ]
            ids = _join([f"{{{k}}}" for k in range(len(ranked))])
            answer = f"There is {_join(parts)}. The IDs of these objects are {ids}."
            lead = (
                f"The {describe(self.scene.object(self.decision.trigger))} matters most because "
                f"{self.decision.reason}"
                if self.decision.trigger
                else f"{_cap(self.decision.reason)}"
            )
            rationale = (
                f"{lead}; the other objects are the road users and signals closest to the ego vehicle's path."
            )
            tags = [self.views.tag(o.id, k) for k, o in enumerate(ranked, start=1)]
            qa = self._qa(
                "multi_view_object_extraction",
                "open",
                "What are the important objects in the current scene? Those objects will be considered for "
                "the future reasoning and driving decision.",
                answer.format(*tags),
                rationale,
                refs=ranked,
                ranked_ids=[o.id for o in ranked],
            )
            return qa
        unique = [o for o in self.visible if sum(describe(p) == describe(o) for p in self.scene.objects) == 1]
        if self.views.kind == "multi" and unique and self.rng.random() < 0.5:
            obj = self.rng.choice(unique)
            shown = set(self.views.placements[obj.id])
            cam = self.views.camera(obj.id)
            others = self.rng.sample([c for c in CAMERAS if c not in shown], 3)
            label = {c: f"The {_view_label(c)} camera." for c in CAMERAS}
            options, letter = _options(self.rng, label[cam], [label[c] for c in others])
            question = _with_options(f"In which camera view is the {describe(obj)} visible?", options)
            rationale = f"{self._locate(obj, 'the target')}; it appears in no other listed view."
            return self._qa(
                "multi_view_object_extraction",
                "mcq",
                question,
                letter,
                rationale,
                options=options,
                object_id=obj.id,
                camera=cam,
            )
        obj = self.rng.choice(self.visible)
        absent = [d for d in (_describe(*p) for p in _description_pool()) if d not in present]
        wrong = self.rng.sample(absent, 3)
        options, letter = _options(
            self.rng, _sentence(article(describe(obj))), [_sentence(article(w)) for w in wrong]
        )
        where_seen = "front view" if self.views.kind == "single" else "surround views"
        question = _with_options(f"Which of the following objects can be seen in the {where_seen}?", options)
        rationale = (
            f"{self._locate(obj, 'the answer')}; none of the other listed objects appears in the images."
        )
        return self._qa(
            "multi_view_object_extraction",
            "mcq",
            question,
            letter,
            rationale,
            options=options,
            object_id=obj.id,
        )

    # --- reasoning ---
    def attention_based_reasoning(self) -> QA | None:
        if not self.visible:
            return None
        signs = [o for o in self.visible if o.category == "stop sign"]
        if self.rng.random() < 0.5:
            if signs and self.rng.random() < 0.5:
                obj = signs[0] if self.rng.random() < 0.5 else self.rng.choice(self.visible)
                yes = obj.category == "stop sign"
                rationale = (
                    f"{self._locate(obj)}, so it {'is' if yes else 'is not'} a traffic sign or road barrier."
                )
                return self._qa(
                    "attention_based_reasoning",
                    "yes/no",
                    "Is {0} a traffic sign or a road barrier?",
                    "Yes." if yes else "No.",
                    rationale,
                    refs=[obj],
                    sign=yes,
                )
            in_path = [o for o in self.visible if _zone(self.scene, o) in ("path", "right_edge")]
            obj = self._pick(self.visible, in_path)
            yes = obj in in_path
            verdict = (
                "it lies in the ego vehicle's lane ahead"
                if yes
                else "it stays clear of the ego vehicle's lane"
            )
            return self._qa(
                "attention_based_reasoning",
                "yes/no",
                "Would {0} be in the moving direction of the ego vehicle?",
                "Yes." if yes else "No.",
                f"{self._locate(obj)}, so {verdict}.",
                refs=[obj],
                in_path=yes,
            )
        ranked = self._ranked()[:3]
        sentences, questions = [], []
        for k, obj in enumerate(ranked):
            action = object_plan(self.scene, obj, self.decision)[0]
            state = f"{article(describe(obj))} {relation(self.scene, obj)}"
            if obj.is_road_user:
                state += f" ({obj.motion})"
            if obj.id == self.decision.trigger or (_rule_of(self.scene, obj) or ("", "keep"))[1] != "keep":
                act = f"so the ego vehicle should {action}"
            else:
                act = "so the ego vehicle should keep monitoring it"
            sentences.append(f"{_cap(ORDINALS[k])}ly notice {{{k}}}. The object is {state}, {act}.")
            questions.append(
                f"What object should the ego vehicle notice {ORDINALS[k]}? What is the state of the object "
                "and what action should the ego vehicle take?"
            )
        questions[0] = (
            "What object should the ego vehicle notice first when the ego vehicle is getting to the next "
            "possible location? What is the state of the object that is first noticed by the ego vehicle and "
            "what action should the ego vehicle take?"
        )
        tags = [self.views.tag(o.id, k) for k, o in enumerate(ranked, start=1)]
        head = ranked[0]
        rationale = (
            f"The {describe(head)} comes first because "
            + (
                self.decision.reason
                if head.id == self.decision.trigger
                else "it is the closest object to the path"
            )
            + "; the rest are ordered by how much they constrain the ego vehicle and by distance."
        )
        return self._qa(
            "attention_based_reasoning",
            "open",
            " ".join(questions),
            " ".join(sentences).format(*tags),
            rationale,
            refs=ranked,
            ranked_ids=[o.id for o in ranked],
        )

    def ego_behavior(self) -> QA:
        ego = self.scene.ego
        combos = [(s, v) for s in STEERS for v in SPEEDS if (s, v) != (ego.steer, ego.speed)]
        near = [c for c in combos if c[0] == ego.steer or c[1] == ego.speed]
        wrong = self.rng.sample(near, 2)
        wrong.append(self.rng.choice([c for c in combos if c not in wrong]))

        def text(steer: str, speed: str) -> str:
            return f"The ego vehicle is {steer}. The ego vehicle is {speed}."

        options, letter = _options(self.rng, text(ego.steer, ego.speed), [text(*c) for c in wrong])
        question = _with_options("Predict the behavior of the ego vehicle.", options)
        rationale = (
            f"{_cap(STEER_CUES[ego.steer])}, so the ego vehicle is {ego.steer}; {SPEED_CUES[ego.speed]}, so "
            f"it is {ego.speed}."
        )
        return self._qa(
            "ego_behavior",
            "mcq",
            question,
            letter,
            rationale,
            options=options,
            steer=ego.steer,
            speed=ego.speed,
        )

    # --- planning ---
    def rationale_grounded_planning(self) -> QA | None:
        if not self.visible:
            return None
        trigger = [o for o in self.visible if o.id == self.decision.trigger]
        obj = self._pick(self.visible, trigger)
        action, reason, probability = object_plan(self.scene, obj, self.decision)
        fired = _rule_of(self.scene, obj)
        rule = (
            fired[0]
            if fired and (fired[1] != "keep" or obj.id == self.decision.trigger)
            else self.decision.rule
        )
        rationale = f"{self._locate(obj)}; {RULE_EXPLANATION[rule]}, with {probability} probability."
        if self.rng.random() < 0.5:
            answer = f"The action is to {action}. The reason is that {reason}, which has a {probability} "
            answer += "probability."
            return self._qa(
                "rationale_grounded_planning",
                "open",
                "What actions could the ego vehicle take based on {0}? Why take this action and what's the "
                "probability?",
                answer,
                rationale,
                refs=[obj],
                action=action,
                probability=probability,
            )
        pool = [a for a in ACTIONS if a != action and a not in self.decision.safe]
        main = [a for a in pool if a in GROUP_ACTION.values() or a == STATIONARY]
        wrong = self.rng.sample(main, min(2, len(main)))
        wrong += self.rng.sample([a for a in pool if a not in wrong], 3 - len(wrong))
        options, letter = _options(self.rng, _sentence(action), [_sentence(a) for a in wrong])
        question = _with_options("Based on {0}, what should the ego vehicle do?", options)
        return self._qa(
            "rationale_grounded_planning",
            "mcq",
            question,
            letter,
            rationale,
            refs=[obj],
            options=options,
            action=action,
            probability=probability,
        )

    def safe_action_set(self) -> QA:
        d = self.decision
        because = _cap(d.reason)
        if self.rng.random() < 0.5:
            answer = _sentence(", ".join(d.safe))
            rationale = f"{because}, so the ego vehicle should {d.action}"
            return self._qa(
                "safe_action_set",
                "open",
                "In this scenario, what are safe actions to take for the ego vehicle?",
                answer,
                rationale + ".",
                safe=list(d.safe),
            )
        yes = not d.risky or self.rng.random() < 0.5
        action = self.rng.choice(d.safe if yes else d.risky)
        verdict = "is among the safe actions" if yes else "would be unsafe"
        rationale = f"{because}, so the ego vehicle should {d.action}; to {action} {verdict}."
        return self._qa(
            "safe_action_set",
            "yes/no",
            f"Is it safe for the ego vehicle to {action} in this scenario?",
            "Yes." if yes else "No.",
            rationale,
            asked_action=action,
            safe=yes,
        )

    def collision_inducing_actions(self) -> QA | None:
        if not self.visible:
            return None
        hitting = [o for o in self.visible if collisions(self.scene, o)[0]]
        obj = self._pick(self.visible, hitting)
        hits, harmless, why = collisions(self.scene, obj)
        rationale = f"{self._locate(obj)}; {why}."
        if hits and self.rng.random() < 0.5:
            hit = self.rng.choice(hits)
            options, letter = _options(
                self.rng, _sentence(hit), [_sentence(a) for a in self.rng.sample(harmless, 3)]
            )
            question = _with_options("Which action could lead to a collision with {0}?", options)
            return self._qa(
                "collision_inducing_actions",
                "mcq",
                question,
                letter,
                rationale,
                refs=[obj],
                options=options,
                collision_actions=list(hits),
            )
        answer = _sentence(", ".join(hits)) if hits else NO_COLLISION
        return self._qa(
            "collision_inducing_actions",
            "open",
            "What actions could lead to a collision with {0}?",
            answer,
            rationale,
            refs=[obj],
            collision_actions=list(hits),
        )


def _context(environment: dict[str, Any]) -> str:
    """The scene facts every rationale ends with: weather, the visible traffic light, junction features."""
    parts = [f"{environment['weather']} weather"]
    if environment["traffic_light"]:
        parts.append(f"a {environment['traffic_light']} light")
    parts += [article(name) for name in ("intersection", "crosswalk") if environment[name]]
    if environment["stop_sign"]:
        parts.append("a stop sign")
    return f"Scene: {', '.join(parts)}."


def _description_pool() -> list[tuple[str, str]]:
    """Every (category, colour) the generator can draw."""
    vehicles = [(v, c) for v in VEHICLE_SIZES for c in VEHICLE_COLOURS]
    people = [(p, c) for p in ("pedestrian", "cyclist") for c in CLOTHES_COLOURS]
    signals = [("traffic light", s) for s in LIGHT_STATES]
    return [*vehicles, *people, *signals, ("stop sign", "red")]


def _similar_descriptions(rng: random.Random, obj: SceneObject) -> list[str]:
    """Three wrong descriptions, preferring near misses (same category or same colour)."""
    pool = [p for p in _description_pool() if _describe(*p) != describe(obj)]
    same_cat = [p for p in pool if p[0] == obj.category]
    same_colour = [p for p in pool if p[1] == obj.colour and p[0] != obj.category]
    picks: list[str] = []
    for group in (same_cat, same_colour, pool, pool):
        left = [d for d in (_describe(*p) for p in group) if d not in picks]
        if left and len(picks) < 3:
            picks.append(rng.choice(left))
    return picks


def _other_category(rng: random.Random, category: str) -> str:
    if category in VEHICLE_SIZES:
        return rng.choice([c for c in VEHICLE_SIZES if c != category])
    return rng.choice([c for c in ("pedestrian", "cyclist", "traffic light", "stop sign") if c != category])


def ask_driving(scene: Scene, views: SceneViews, rng: random.Random) -> list[QA]:
    """One question of each of the eight types (fewer when no object is visible)."""
    asker = _Asker(scene, views, rng)
    builders: list[Callable[[], QA | None]] = [getattr(asker, name) for name in QUESTION_TYPES]
    return [qa for build in builders if (qa := build()) is not None]


# --- general domain ---
def _region(x: float, y: float) -> str:
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    return f"{'top' if y < 0.5 else 'bottom'} {col}"


def ask_general(scene: ShapeScene, rng: random.Random) -> list[QA]:
    """Counting, colour, shape and presence questions about a plain shapes image."""
    shapes = scene.shapes
    out: list[QA] = []

    def qa(
        qtype: str,
        form: str,
        question: str,
        answer: str,
        rationale: str,
        options: dict[str, str] | None = None,
        **target: Any,
    ) -> None:
        gt = {
            "question_type": qtype,
            "shapes": [[s.kind, s.colour, round(s.x, 3), round(s.y, 3)] for s in shapes],
            "answer_text": options[answer] if options else answer,
            "target": target,
        }
        out.append(QA(qtype, form, question, answer, rationale, options, [], gt))

    kind = rng.choice(SHAPE_KINDS)
    count = sum(s.kind == kind for s in shapes)
    wrong = rng.sample([str(n) for n in range(7) if n != count], 3)
    options, letter = _options(rng, str(count), wrong)
    qa(
        "general_count",
        "mcq",
        _with_options(f"How many {kind}s are there in the image?", options),
        letter,
        f"The image shows {len(shapes)} shapes, {count} of which {'is a' if count == 1 else 'are'} "
        f"{kind}{'' if count == 1 else 's'}.",
        options,
        kind=kind,
        count=count,
    )

    singles = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
    if singles:
        s = rng.choice(singles)
        qa(
            "general_colour",
            "open",
            f"What colour is the {s.kind}?",
            _sentence(s.colour),
            f"The only {s.kind} in the image, at the {_region(s.x, s.y)}, is filled with {s.colour}.",
            kind=s.kind,
            colour=s.colour,
        )

    by_colour = [s for s in shapes if sum(t.colour == s.colour for t in shapes) == 1]
    if by_colour:
        s = rng.choice(by_colour)
        options, letter = _options(rng, _sentence(s.kind), [_sentence(k) for k in SHAPE_KINDS if k != s.kind])
        qa(
            "general_shape",
            "mcq",
            _with_options(f"What shape is the {s.colour} object?", options),
            letter,
            f"The only {s.colour} object, at the {_region(s.x, s.y)}, is a {s.kind}.",
            options,
            kind=s.kind,
            colour=s.colour,
        )

    combos = {(s.colour, s.kind) for s in shapes}
    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(combos))
    else:
        colour, kind = rng.choice(
            [(c, k) for c in SHAPE_COLOURS for k in SHAPE_KINDS if (c, k) not in combos]
        )
    yes = (colour, kind) in combos
    listed = _join([f"{article(s.colour)} {s.kind}" for s in shapes])
    qa(
        "general_presence",
        "yes/no",
        f"Is there {article(colour)} {kind} in the image?",
        "Yes." if yes else "No.",
        f"The image contains {listed}.",
        colour=colour,
        kind=kind,
        present=yes,
    )
    return out
