"""The Drive-KD release format (messages / images / question_type): import, export, round trip and named errors,
on a look-alike set written for these tests (tests/fixtures/drivekd_mini.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.drivekd_format import camera_of, import_drivekd, question_type, split_final, to_drivekd
from drivekd.data.drivelm import import_drivelm
from drivekd.data.qa import Where
from drivekd.data.schema import read_jsonl
from drivekd.errors import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MINI = FIXTURES / "drivekd_mini.json"
runner = CliRunner()


def _items() -> list[dict[str, Any]]:
    return json.loads(MINI.read_text(encoding="utf-8"))


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_import_of_the_look_alike_set() -> None:
    result = import_drivekd(MINI, None, text_only=True)
    assert not result.errors
    samples = result.samples
    assert [s.id for s in samples] == [f"drivekd_mini_{k}" for k in range(7)]
    assert [(s.capability, s.task, s.kind) for s in samples] == [
        ("perception", "perception", "mcq"),
        ("perception", "perception", "open"),  # "Perceptual"
        ("reasoning", "prediction", "open"),  # "reason", not an ego-behaviour MCQ
        ("reasoning", "behavior", "mcq"),  # "reasoning", ego-behaviour MCQ
        ("planning", "planning", "open"),  # "plan"
        ("planning", "planning", "open"),  # "decision"
        ("perception", "perception", "yes/no"),
    ]
    first, six, _, behavior, planning, bare, yes_no = samples
    assert first.answer == "A" and first.options == {
        "A": "Going ahead.",
        "B": "Turn left.",
        "C": "Turn right.",
    }
    assert first.rationale == "Object: black sedan  \nContextual evidence: it keeps its lane."
    assert [(im.camera, im.path) for im in first.images] == [
        ("CAM_FRONT", "bdd100k/images/100k/train/0001.jpg")
    ]
    assert first.question.startswith("What is the moving status") and "<image>" not in first.question
    assert [im.camera for im in six.images] == [
        "CAM_FRONT",
        "CAM_FRONT_RIGHT",
        "CAM_FRONT_LEFT",
        "CAM_BACK",
        "CAM_BACK_LEFT",
        "CAM_BACK_RIGHT",
    ]
    assert six.images[0].path == "nuscenes/samples/CAM_FRONT/n008-frame1__CAM_FRONT__1.jpg"
    assert six.rationale is None and six.answer.startswith("- <c1,CAM_FRONT_LEFT,0.0955,0.7989>, black SUV")
    assert [str(o) for o in six.objects] == [
        "<c1,CAM_FRONT_LEFT,0.0955,0.7989>",
        "<c2,CAM_BACK_LEFT,0.6786,0.6916>",
    ]
    assert behavior.answer == "B" and behavior.rationale == "Support: the lane curves gently to the right."
    assert planning.answer == "keep going at the same speed"
    assert (
        planning.rationale
        == "Target: <c1,CAM_FRONT,0.1796,0.5630> (white van), ahead in the same lane.  \nProbability: High"
    )
    assert [str(o) for o in planning.objects] == ["<c1,CAM_FRONT,0.1796,0.5630>"]
    assert bare.answer == "brake gently to a stop; the road is wet." and bare.rationale is None
    assert yes_no.answer == "No." and yes_no.rationale == "The light shows red."
    assert all(s.text_only for s in samples)


def test_import_export_import_is_the_identity(tmp_path: Path) -> None:
    samples = import_drivekd(MINI, None, text_only=True).samples
    items = to_drivekd(samples)
    assert items[0]["messages"][1]["content"].startswith("Final: A. Going ahead.\nObject: black sedan")
    assert items[1]["messages"][0]["content"].startswith("<image>" * 6 + "What are the important objects")
    assert [item["question_type"] for item in items] == [
        "perception", "perception", "reasoning", "reasoning", "planning", "planning", "perception"
    ]  # fmt: skip
    again = import_drivekd(_write(tmp_path / "out.json", items), None, text_only=True).samples
    assert again == samples


def test_round_trip_through_the_cli(tmp_path: Path) -> None:
    jsonl, items, back = tmp_path / "a.jsonl", tmp_path / "items.json", tmp_path / "b.jsonl"
    assert (
        runner.invoke(
            app, ["data", "import-drivekd", str(MINI), "--out", str(jsonl), "--text-only"]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["data", "export-drivekd", str(jsonl), "--out", str(items)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "import-drivekd", str(items), "--out", str(back), "--text-only"])
    assert result.exit_code == 0, result.output
    assert list(read_jsonl(back)) == list(read_jsonl(jsonl))


def test_drivelm_samples_survive_the_release_format(tmp_path: Path) -> None:
    """What the format carries of DriveLM samples (all but scene/frame tokens and upstream meta) comes back."""
    samples = import_drivelm(FIXTURES / "drivelm_mini.json", None, text_only=True).samples
    again = import_drivekd(_write(tmp_path / "lm.json", to_drivekd(samples)), None, text_only=True).samples
    lost = {"scene_id", "frame_id", "meta"}
    assert [s.model_dump(exclude=lost) for s in again] == [s.model_dump(exclude=lost) for s in samples]


def test_images_are_checked_under_the_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        import_drivekd(MINI, tmp_path)
    # 3 single-view images and 2 distinct six-view frames.
    assert "15 images are not on disk (7 rows)" in str(caught.value)
    assert "bdd100k/images/100k/train/<image>.jpg" in str(caught.value)
    for item in _items():
        for rel in item["images"]:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).touch()
    samples = import_drivekd(MINI, tmp_path).samples
    assert len(samples) == 7 and not any(s.text_only for s in samples)


# --- errors -------------------------------------------------------------------------------------------------


def _set(k: int, *path: Any, value: Any) -> Any:
    def breaker(items: list[Any]) -> None:
        target = items[k]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return breaker


def _drop_assistant(items: list[Any]) -> None:
    items[1]["messages"] = items[1]["messages"][:1]


BREAKS = [
    # The released demo.json's item 2 writes pixel-like x in a normalised tag.
    (_set(2, "messages", 1, "content", value="First: <c1,CAM_FRONT,4.32,0.85>, gray pickup truck"), 2, "messages.1.content"),
    (_set(1, "messages", 1, "content", value="IDs: <c1,CAM_FRONT_LEFT,0.0955,0.7989><c4,CAM_FRONT,0.8441,0.83"), 1, "messages.1.content"),
    (_set(0, "question_type", value="parking"), 0, "question_type"),
    (_set(1, "messages", 0, "content", value="<image><image>What are the important objects?"), 1, "messages.0.content"),
    (_set(1, "images", 1, value="frames/0002.jpg"), 1, "images.1"),
    (_set(1, "images", 1, value=_items()[1]["images"][0]), 1, "images.1"),  # the same camera twice
    (_set(0, "images", value=[]), 0, "images"),
    (_set(0, "messages", 1, "content", value="Final: {A. Turn left.}"), 0, "messages.1.content"),
    (_set(0, "messages", 1, "content", value="Final: going ahead"), 0, "messages.1.content"),
    (_set(0, "messages", 1, "content", value=3), 0, "messages.1.content"),
    (_drop_assistant, 1, "messages"),
    (_set(3, "messages", 0, "content", value="<image>" * 6 + "What is it? Please select the correct answer from the following options: A. Car."), 3, "messages.0.content"),
]  # fmt: skip


@pytest.mark.parametrize(("breaker", "row", "field"), BREAKS)
def test_named_errors_and_skip_invalid(tmp_path: Path, breaker: Any, row: int, field: str) -> None:
    items = _items()
    breaker(items)
    path = _write(tmp_path / "bad.json", items)
    with pytest.raises(DataError) as caught:
        import_drivekd(path, None, text_only=True)
    err = caught.value
    assert (err.file, err.row, err.field) == (str(path), row, field)
    assert f"{path}, row {row}, field '{field}'" in str(err)
    result = import_drivekd(path, None, text_only=True, skip_invalid=True)
    assert [(e.row, e.field) for e in result.errors] == [(row, field)] and len(result.samples) == 6


def test_a_refused_tag_is_never_altered(tmp_path: Path) -> None:
    items = _items()
    BREAKS[0][0](items)
    result = import_drivekd(_write(tmp_path / "bad.json", items), None, text_only=True, skip_invalid=True)
    assert "coordinate 4.32 is not normalised" in str(result.errors[0])
    assert not any("4.32" in (s.rationale or "") + s.answer for s in result.samples)


def test_not_a_list() -> None:
    with pytest.raises(DataError, match="expected a JSON list of items"):
        import_drivekd(FIXTURES / "drivelm_mini.json", None, text_only=True)


def test_items_under_a_wrapper_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "wrapped.json", {"data": _items()})
    assert import_drivekd(path, None, text_only=True).samples == [
        s.model_copy(update={"id": s.id.replace("drivekd_mini", "wrapped")})
        for s in import_drivekd(MINI, None, text_only=True).samples
    ]


# --- the pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("perception", "perception"),
        ("P", "perception"),
        ("Logical-Reasoning", "reasoning"),
        ("infer", "reasoning"),
        ("Decision", "planning"),
        ("motion planning", "planning"),  # contains "plan"
        ("prediction", "prediction"),
        ("behaviour", "behavior"),
    ],
)
def test_question_type_aliases(raw: str, expected: str) -> None:
    assert question_type(Where("f", 0), "question_type", raw) == expected


def test_unknown_question_type() -> None:
    with pytest.raises(DataError, match="unknown question_type 'parking'"):
        question_type(Where("f", 0), "question_type", "parking")


@pytest.mark.parametrize(
    ("path", "camera"),
    [
        (
            ".../nuscenes/samples/CAM_FRONT_LEFT/n015-2018__CAM_FRONT_LEFT__1533279665104844.jpg",
            "CAM_FRONT_LEFT",
        ),
        ("sweeps/n015-2018__CAM_BACK__1533.jpg", "CAM_BACK"),
        ("train/images/0001/CAM_BACK_RIGHT.png", "CAM_BACK_RIGHT"),
        (".../100k/train/9afb9daf-81ca742d.jpg", None),
    ],
)
def test_camera_of(path: str, camera: str | None) -> None:
    assert camera_of(path) == camera


@pytest.mark.parametrize(
    ("reply", "answer", "rationale"),
    [
        ("Final: {A. Going ahead.}  \nObject: car", "A. Going ahead.", "Object: car"),
        ("Reason: clear road.\nFinal: keep going", "keep going", "Reason: clear road."),
        ("final : stop", "stop", None),
        ("brake gently; the road is wet.", "brake gently; the road is wet.", None),
        ("Final:{B}\n\nwhy", "B", "why"),
    ],
)
def test_split_final(reply: str, answer: str, rationale: str | None) -> None:
    assert split_final(reply) == (answer, rationale)


def test_export_refuses_a_multi_line_answer_with_a_rationale() -> None:
    sample = import_drivekd(MINI, None, text_only=True).samples[4]
    with pytest.raises(DataError, match="several lines"):
        to_drivekd([sample.model_copy(update={"answer": "keep going\nat the same speed"})])
