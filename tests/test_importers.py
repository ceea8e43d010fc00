"""DriveLM and DriveBench importers, the DriveBench exporter, and the errors they raise on bad rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivekd.data.drivebench import drivebench_tag, import_drivebench, to_drivebench
from drivekd.data.drivelm import import_drivelm
from drivekd.data.qa import format_options, infer_kind, parse_options
from drivekd.data.schema import Sample, read_jsonl, write_jsonl
from drivekd.data.tags import ObjectTag
from drivekd.errors import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "drivelm-sample"


@pytest.fixture
def shared_root() -> Path:
    if not (SHARED / "test_eval.json").is_file():
        pytest.skip(f"shared DriveLM sample not found at {SHARED}")
    return SHARED


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """An image root holding (empty) images for every path the hand-made fixtures name: DriveLM's re-rooted at
    nuscenes/, DriveBench's verbatim under data/nuscenes/ (the root of a DriveBench checkout)."""
    root = tmp_path / "images"
    for folder in (root / "nuscenes", root / "data" / "nuscenes"):
        for camera in ("CAM_FRONT", "CAM_BACK"):
            for frame in ("frame1", "frame2"):
                image = folder / "samples" / camera / f"{frame}.jpg"
                image.parent.mkdir(parents=True, exist_ok=True)
                image.touch()
    return root


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _frame(data: dict[str, Any]) -> dict[str, Any]:
    """The first key frame of the DriveLM fixture."""
    return data["scene1"]["key_frames"]["frame1"]


def _same(a: list[Sample], b: list[Sample]) -> None:
    """Every field but ``meta`` (which records the upstream format) is equal."""
    assert [s.model_dump(exclude={"meta"}) for s in a] == [s.model_dump(exclude={"meta"}) for s in b]


# --- the real DriveLM challenge sample ----------------------------------------------------------------------


@pytest.mark.shared
def test_drivelm_test_eval(shared_root: Path) -> None:
    result = import_drivelm(shared_root / "test_eval.json", shared_root)
    samples = result.samples
    assert len(samples) == 66 and not result.errors
    assert len({s.frame_id for s in samples}) == 9
    assert Counter(s.task for s in samples) == dict(perception=17, prediction=13, planning=27, behavior=9)
    assert Counter((s.task, s.kind) for s in samples) == {
        ("perception", "mcq"): 8,
        ("perception", "open"): 9,
        ("prediction", "yes/no"): 9,
        ("prediction", "open"): 4,
        ("planning", "open"): 27,
        ("behavior", "mcq"): 9,
    }
    images = [im for s in samples for im in s.images]
    assert len(images) == 6 * 66 and all(im.resolve(shared_root).is_file() for im in images)
    assert all(s.images[0].path.startswith("nuscenes/samples/CAM_FRONT/") for s in samples)
    # DriveLM's challenge tags follow the DriveBench rules, so the exporter's rule reproduces every one.
    assert all(s.meta["drivelm_tag"] == [drivebench_tag(s.task, s.kind)] for s in samples)


@pytest.mark.shared
def test_drivelm_tags_are_normalised(shared_root: Path) -> None:
    samples = import_drivelm(shared_root / "test_eval.json", shared_root).samples
    # <c1,CAM_BACK,1088.3,497.5> in the first frame's "important objects" answer.
    first = samples[0]
    expected = ObjectTag(id="c1", camera="CAM_BACK", x=round(1088.3 / 1600, 4), y=round(497.5 / 900, 4))
    assert (expected.x, expected.y) == (0.6802, 0.5528)
    assert expected in first.objects
    assert "<c1,CAM_BACK,0.6802,0.5528>" in first.answer and "1088.3" not in first.answer
    assert not any("1088.3" in s.question or "1088.3" in s.answer for s in samples)


@pytest.mark.shared
def test_drivelm_mcq_options(shared_root: Path) -> None:
    samples = import_drivelm(shared_root / "test_eval.json", shared_root).samples
    asked = "What is the moving status of object <c1,CAM_BACK,0.6802,0.5528>?"
    status = next(s for s in samples if s.question.startswith(asked))
    assert status.kind == "mcq" and status.answer == "D"
    assert status.options == {"A": "Going ahead.", "B": "Stopped.", "C": "Back up.", "D": "Turn left."}
    behavior = next(s for s in samples if s.task == "behavior")
    assert behavior.options is not None and len(behavior.options) == 4
    assert behavior.options["A"].count("The ego vehicle") == 2  # option texts keep their inner full stops


@pytest.mark.shared
def test_drivelm_before_mcq_conversion(shared_root: Path) -> None:
    samples = import_drivelm(shared_root / "test.json", shared_root).samples
    assert len(samples) == 66 and Counter(s.kind for s in samples) == {"open": 57, "yes/no": 9}


@pytest.mark.shared
def test_drivelm_train_sample(shared_root: Path, tmp_path: Path) -> None:
    samples = import_drivelm(shared_root / "train_sample.json", shared_root).samples
    assert len(samples) == 790
    assert Counter(s.task for s in samples) == dict(perception=337, prediction=271, planning=173, behavior=9)
    assert Counter(s.kind for s in samples) == {"open": 558, "yes/no": 232}
    referencing = [s for s in samples if s.objects]
    assert len(referencing) == 508
    assert all(set(s.meta["object_infos"]) <= {str(o) for o in s.objects} for s in referencing)
    info = next(s for s in referencing if "<c1,CAM_BACK,0.6802,0.5528>" in s.meta["object_infos"])
    assert info.meta["object_infos"]["<c1,CAM_BACK,0.6802,0.5528>"]["Visual_description"] == "Brown SUV."
    # Stored image paths are relative to the image root, so read_jsonl finds them there.
    write_jsonl(samples, tmp_path / "train.jsonl")
    assert len(list(read_jsonl(tmp_path / "train.jsonl", image_root=shared_root))) == 790


@pytest.mark.shared
@pytest.mark.parametrize("name", ["test_eval.json", "train_sample.json"])
def test_drivebench_round_trip_of_shared_sample(shared_root: Path, tmp_path: Path, name: str) -> None:
    samples = import_drivelm(shared_root / name, shared_root).samples
    rows = to_drivebench(samples)
    keys = {"scene_token", "frame_token", "question_type", "question", "answer", "tag", "image_path"}
    assert all(set(row) == keys for row in rows)
    back = import_drivebench(_write(tmp_path, rows), shared_root)
    assert not back.errors
    _same(samples, back.samples)
    assert [s.meta["drivebench_tag"] for s in back.samples] == [row["tag"] for row in rows]


# --- hand-made fixtures ---------------------------------------------------------------------------------


def test_drivelm_fixture(mini_root: Path) -> None:
    samples = import_drivelm(FIXTURES / "drivelm_mini.json", mini_root).samples
    assert [(s.task, s.kind) for s in samples] == [
        ("perception", "open"),
        ("perception", "mcq"),
        ("prediction", "yes/no"),
        ("planning", "open"),
        ("behavior", "mcq"),
        ("perception", "yes/no"),
        ("planning", "open"),
    ]
    assert samples[1].id == "scene1_frame1_perception_1"
    assert samples[1].options == {"A": "Parked.", "B": "Driving ahead.", "C": "Reversing."}
    assert [im.camera for im in samples[0].images] == ["CAM_FRONT", "CAM_BACK"]
    assert samples[-1].objects == [ObjectTag(id="c2", camera="CAM_BACK", x=0.25, y=0.6667)]
    assert "<c2,CAM_BACK,0.2500,0.6667>" in samples[-1].answer
    infos = _frame(_load("drivelm_mini.json"))["key_object_infos"]
    assert samples[0].meta == {
        "drivelm_tag": [2],
        "object_infos": {"<c1,CAM_FRONT,0.5000,0.5000>": infos["<c1,CAM_FRONT,800.0,450.0>"]},
    }
    assert "object_infos" not in samples[-1].meta  # c2 has no key_object_infos entry


def test_drivebench_fixture_round_trip(mini_root: Path, tmp_path: Path) -> None:
    result = import_drivebench(FIXTURES / "drivebench_mini.json", mini_root)
    samples = result.samples
    assert [s.kind for s in samples] == ["mcq", "open", "open"]
    assert samples[0].images[0].path == "data/nuscenes/samples/CAM_FRONT/frame1.jpg"  # verbatim
    # The fixture writes bare ints; they are kept as the one-element lists the release writes.
    assert samples[1].meta == {"drivebench_tag": [3], "pred": "The hatchback in front."}
    assert samples[0].objects == [ObjectTag(id="c1", camera="CAM_FRONT", x=0.5, y=0.5)]
    rows = to_drivebench(samples)
    assert rows[1]["pred"] == "The hatchback in front." and [r["tag"] for r in rows] == [[0], [3], [1]]
    again = import_drivebench(_write(tmp_path, rows), mini_root).samples
    _same(samples, again)
    assert again[1].meta == samples[1].meta


def test_drivelm_to_drivebench_round_trip(mini_root: Path, tmp_path: Path) -> None:
    samples = import_drivelm(FIXTURES / "drivelm_mini.json", mini_root).samples
    rows = to_drivebench(samples)
    assert [r["tag"] for r in rows] == [[2], [0], [0], [1], [0], [2], [1]]
    assert rows[0]["image_path"] == {
        "CAM_FRONT": "nuscenes/samples/CAM_FRONT/frame1.jpg",
        "CAM_BACK": "nuscenes/samples/CAM_BACK/frame1.jpg",
    }
    _same(samples, import_drivebench(_write(tmp_path, rows), mini_root).samples)


def test_export_appends_options_missing_from_the_question(mini_root: Path) -> None:
    sample = import_drivelm(FIXTURES / "drivelm_mini.json", mini_root).samples[1]
    bare = sample.model_copy(update={"question": "What is the car doing?", "meta": {}})
    (row,) = to_drivebench([bare])
    assert row["question"].startswith("What is the car doing? Please select")
    assert parse_options(row["question"]) == sample.options


@pytest.mark.parametrize(
    ("task", "kind", "tag"),
    [
        ("perception", "mcq", 0),
        ("perception", "open", 2),
        ("perception", "yes/no", 2),
        ("prediction", "open", 3),
        ("prediction", "yes/no", 0),
        ("planning", "open", 1),
        ("planning", "yes/no", 1),
        ("behavior", "mcq", 0),
    ],
)
def test_drivebench_tag_rules(task: str, kind: str, tag: int) -> None:
    assert drivebench_tag(task, kind) == tag


@pytest.mark.parametrize(
    ("answer", "kind"),
    [("Yes.", "yes/no"), ("no", "yes/no"), ("No, it is parked.", "open"), ("None.", "open")],
)
def test_infer_kind_without_options(answer: str, kind: str) -> None:
    assert infer_kind(answer, None) == kind


def test_infer_kind_mcq_needs_a_letter() -> None:
    assert infer_kind("B", {"A": "x", "B": "y"}) == "mcq"
    with pytest.raises(ValueError, match="option letters"):
        infer_kind("y", {"A": "x", "B": "y"})


def test_parse_options_needs_two() -> None:
    assert parse_options("What is it?") is None
    with pytest.raises(ValueError, match="at least two"):
        parse_options("What is it? Please select the correct answer from the following options: A. Car.")


@given(
    st.lists(st.from_regex(r"[a-z][a-z ,.]{0,20}[a-z.]", fullmatch=True), min_size=2, max_size=4).map(
        lambda texts: dict(zip("ABCD", texts, strict=False))
    )
)
def test_options_round_trip(options: dict[str, str]) -> None:
    assert parse_options(f"Which one? {format_options(options)}") == options


# --- errors ---------------------------------------------------------------------------------------------

FRAME = "scene1/frame1"
ITEM = "scene1/frame1/QA/perception/1"


def _missing_image(data: dict[str, Any]) -> None:
    _frame(data)["image_paths"]["CAM_FRONT"] = "../nuscenes/samples/CAM_FRONT/absent.jpg"


def _unknown_camera(data: dict[str, Any]) -> None:
    paths = _frame(data)["image_paths"]
    paths["CAM_TOP"] = paths.pop("CAM_BACK")


def _malformed_tag(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["perception"][1]["Q"] = "What is <c1,CAM_FRONT,abc> doing?"


def _tag_camera(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["perception"][1]["Q"] = "What is <c1,CAM_TOP,10.0,20.0> doing?"


def _missing_field(data: dict[str, Any]) -> None:
    del _frame(data)["QA"]["perception"][1]["A"]


def _not_an_object(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["perception"][1] = "Q: what? A: that."


def _wrong_type(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["perception"][1]["A"] = 3


def _not_a_letter(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["perception"][1]["A"] = "Driving ahead."


def _unknown_group(data: dict[str, Any]) -> None:
    _frame(data)["QA"]["parking"] = _frame(data)["QA"].pop("behavior")


DRIVELM_BREAKS = [
    # (break, row, field, skipped samples)
    (_missing_image, FRAME, "image_paths.CAM_FRONT", 5),
    (_unknown_camera, FRAME, "image_paths.CAM_TOP", 5),
    (_malformed_tag, ITEM, "Q", 1),
    (_tag_camera, ITEM, "Q", 1),
    (_missing_field, ITEM, "A", 1),
    (_not_an_object, ITEM, "<row>", 1),
    (_wrong_type, ITEM, "A", 1),
    (_not_a_letter, ITEM, "A", 1),
    (_unknown_group, FRAME, "QA.parking", 1),
]


@pytest.mark.parametrize(("breaker", "row", "field", "skipped"), DRIVELM_BREAKS)
def test_drivelm_errors(
    mini_root: Path, tmp_path: Path, breaker: Any, row: str, field: str, skipped: int
) -> None:
    data = _load("drivelm_mini.json")
    breaker(data)
    path = _write(tmp_path, data)
    with pytest.raises(DataError) as caught:
        import_drivelm(path, mini_root)
    err = caught.value
    assert (err.file, err.row, err.field) == (str(path), row, field)
    assert str(path) in str(err) and f"row {row}" in str(err) and f"field '{field}'" in str(err)
    result = import_drivelm(path, mini_root, skip_invalid=True)
    assert [(e.row, e.field) for e in result.errors] == [(row, field)]
    assert len(result.samples) == 7 - skipped


def _row_missing_image(rows: list[Any]) -> None:
    rows[1]["image_path"]["CAM_FRONT"] = "nuscenes/samples/CAM_FRONT/absent.jpg"


def _row_unknown_camera(rows: list[Any]) -> None:
    rows[1]["image_path"]["CAM_TOP"] = rows[1]["image_path"].pop("CAM_FRONT")


def _row_malformed_tag(rows: list[Any]) -> None:
    rows[1]["question"] = "What is <c1,CAM_FRONT,abc> doing?"


def _row_pixel_tag(rows: list[Any]) -> None:
    rows[1]["answer"] = "Notice <c1,CAM_FRONT,800.0,450.0>."


def _row_missing_field(rows: list[Any]) -> None:
    del rows[1]["answer"]


def _row_wrong_type(rows: list[Any]) -> None:
    rows[1]["tag"] = "3"


def _row_not_an_object(rows: list[Any]) -> None:
    rows[1] = ["scene1", "frame1"]


def _row_unknown_task(rows: list[Any]) -> None:
    rows[1]["question_type"] = "parking"


DRIVEBENCH_BREAKS = [
    (_row_missing_image, "image_path.CAM_FRONT"),
    (_row_unknown_camera, "image_path.CAM_TOP"),
    (_row_malformed_tag, "question"),
    (_row_pixel_tag, "answer"),
    (_row_missing_field, "answer"),
    (_row_wrong_type, "tag"),
    (_row_not_an_object, "<row>"),
    (_row_unknown_task, "question_type"),
]


@pytest.mark.parametrize(("breaker", "field"), DRIVEBENCH_BREAKS)
def test_drivebench_errors(mini_root: Path, tmp_path: Path, breaker: Any, field: str) -> None:
    rows = _load("drivebench_mini.json")
    breaker(rows)
    path = _write(tmp_path, rows)
    with pytest.raises(DataError) as caught:
        import_drivebench(path, mini_root)
    err = caught.value
    assert (err.file, err.row, err.field) == (str(path), 1, field)
    assert str(path) in str(err) and "row 1" in str(err) and f"field '{field}'" in str(err)
    result = import_drivebench(path, mini_root, skip_invalid=True)
    assert [(e.row, e.field) for e in result.errors] == [(1, field)]
    assert [s.task for s in result.samples] == ["perception", "planning"]


def test_skip_invalid_collects_every_bad_row(mini_root: Path, tmp_path: Path) -> None:
    rows = []
    for breaker, _ in DRIVEBENCH_BREAKS:
        chunk = _load("drivebench_mini.json")
        breaker(chunk)  # breaks the chunk's second row
        rows += chunk
    result = import_drivebench(_write(tmp_path, rows), mini_root, skip_invalid=True)
    expected = [(3 * k + 1, field) for k, (_, field) in enumerate(DRIVEBENCH_BREAKS)]
    assert [(e.row, e.field) for e in result.errors] == expected
    assert len(result.samples) == 2 * len(DRIVEBENCH_BREAKS)


@pytest.mark.parametrize("importer", [import_drivelm, import_drivebench])
def test_invalid_json(importer: Any, mini_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"scene_token": "s",', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as caught:
        importer(path, mini_root, skip_invalid=True)
    assert caught.value.row is None and str(caught.value).startswith(str(path))


@pytest.mark.parametrize(("importer", "data"), [(import_drivelm, []), (import_drivebench, {})])
def test_wrong_layout(importer: Any, data: Any, mini_root: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(DataError, match="expected a JSON"):
        importer(path, mini_root)
