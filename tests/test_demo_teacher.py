"""The demo teacher's measurement pieces: per-question-type scores, the acceptance criteria and the blind images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from drivekd.data.schema import ImageRef, Sample
from drivekd.demo.teacher import BLANK, THRESHOLDS, acceptance, blank_images, per_question_type


def _sample(sid: str, qtype: str, kind: str, answer: str, image: str = "a/CAM_FRONT.png") -> Sample:
    options = {k: f"option {k}." for k in "ABCD"} if kind == "mcq" else None
    return Sample(
        id=sid,
        images=[ImageRef(camera="CAM_FRONT", path=image)],
        question="q?",
        capability="perception",
        task="perception",
        kind=kind,
        options=options,
        answer=answer,
        meta={"question_type": qtype},
    )


def test_per_question_type_counts_strict_letters_yes_no_and_judge_means():
    samples = [
        _sample("m1", "moving_status", "mcq", "B"),
        _sample("m2", "moving_status", "mcq", "C"),
        _sample("m3", "moving_status", "mcq", "A"),
        _sample("y1", "safe_action_set", "yes/no", "Yes."),
        _sample("y2", "safe_action_set", "yes/no", "No."),
        _sample("o1", "safe_action_set", "open", "Brake gently to a stop."),
    ]
    predictions = {"m1": "B\nIt is stopped.", "m2": "A", "m3": None, "y1": "Yes.", "y2": "Yes, it is."}
    judged = [{"id": "m1", "scores": [80.0, 60.0]}, {"id": "o1", "scores": [50.0]}]
    rows = per_question_type(samples, predictions, judged)
    assert rows["moving_status"]["mcq_questions"] == 3
    assert rows["moving_status"]["mcq_strict_accuracy"] == 100 / 3  # m2 wrong letter, m3 missing
    assert rows["moving_status"]["yes_no_accuracy"] is None
    assert rows["moving_status"]["judge"] == 70.0
    assert rows["safe_action_set"]["mcq_questions"] == 0
    assert (rows["safe_action_set"]["yes_no_accuracy"], rows["safe_action_set"]["yes_no_questions"]) == (
        50.0,
        2,
    )
    assert rows["safe_action_set"]["judge"] == 50.0


def _scores(mcq: float, blind: float, judge: float, types: dict) -> dict:
    return {
        "mcq_strict_accuracy": mcq,
        "blind_mcq_strict_accuracy": blind,
        "judge_overall": judge,
        "per_question_type": types,
    }


def _row(mcq: float | None, n_mcq: int, yes_no: float | None, judge: float | None) -> dict:
    return {"mcq_strict_accuracy": mcq, "mcq_questions": n_mcq, "yes_no_accuracy": yes_no, "judge": judge}


def test_acceptance_checks_every_criterion():
    types = {"moving_status": _row(90.0, 40, None, 80.0), "safe_action_set": _row(None, 0, 85.0, 50.0)}
    passed = acceptance(_scores(88.0, 40.0, 75.0, types))
    assert passed["all_met"]
    assert passed["checks"]["blind_drop"] == {
        "value": 48.0,
        "threshold": THRESHOLDS["blind_drop"],
        "met": True,
    }
    # one MCQ type under 70 fails the teacher, as does a blind drop under 30 points
    types["moving_status"] = _row(69.0, 40, None, 80.0)
    assert not acceptance(_scores(88.0, 40.0, 75.0, types))["all_met"]
    types["moving_status"] = _row(90.0, 40, None, 80.0)
    assert not acceptance(_scores(88.0, 60.0, 75.0, types))["all_met"]


def test_a_type_without_mcqs_passes_on_yes_no_or_on_its_judge_score():
    low_yes_no = {"safe_action_set": _row(None, 0, 70.0, 65.0)}
    result = acceptance(_scores(90.0, 30.0, 75.0, low_yes_no))
    assert result["all_met"] and result["checks"]["judge/safe_action_set"]["met"]
    low_both = {"safe_action_set": _row(None, 0, 70.0, 55.0)}
    assert not acceptance(_scores(90.0, 30.0, 75.0, low_both))["all_met"]


def test_blank_images_keep_paths_and_sizes(tmp_path: Path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.effect_noise((40, 20), 80).convert("RGB").save(root / "a" / "CAM_FRONT.png")
    out = blank_images([_sample("m1", "moving_status", "mcq", "A")], root, tmp_path / "blind")
    with Image.open(out / "a" / "CAM_FRONT.png") as image:
        assert image.size == (40, 20)
        assert set(image.getdata()) == {BLANK}
