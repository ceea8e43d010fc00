"""DriveBench as released: the real rows in ../shared/data/drivebench-sample (text-only, since no images are
shipped), export back field by field, visual descriptions, the missing-image error, predictions export, the DriveLM
challenge ids and submission, and text-only samples through the readers and the collator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.collate import VLMCollator, build_messages
from drivekd.data.drivebench import import_drivebench, judged, scored_tag, to_drivebench
from drivekd.data.drivelm import challenge_ids, import_drivelm, to_drivelm_submission
from drivekd.data.schema import Sample, read_jsonl, write_jsonl
from drivekd.data.tags import TAG_RE, pixel_tags_in_text
from drivekd.errors import DataError
from drivekd.evaluation.predictions import PredictionRecord, PredictionWriter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCH = SHARED / "drivebench-sample" / "drivebench-test-head.json"
DESCRIPTIONS = SHARED / "drivebench-sample" / "visual_description-head.json"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
runner = CliRunner()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    if not BENCH.is_file():
        pytest.skip(f"shared DriveBench sample not found at {BENCH}")
    return json.loads(BENCH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bench(rows: list[dict[str, Any]]) -> list[Sample]:
    result = import_drivebench(BENCH, None, text_only=True, visual_descriptions=DESCRIPTIONS)
    assert not result.errors
    return result.samples


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- the real rows -------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_text_only_import_counts(bench: list[Sample]) -> None:
    # Counts from the sample's README (question_type / tag).
    assert len(bench) == 37 and all(s.text_only for s in bench)
    assert Counter((s.task, tuple(s.meta["drivebench_tag"])) for s in bench) == {
        ("perception", (2,)): 5,
        ("perception", (0,)): 5,
        ("prediction", (3,)): 2,
        ("prediction", (0,)): 5,
        ("planning", (1,)): 15,
        ("behavior", (0,)): 5,
    }
    assert Counter(s.meta["drivebench_tag"][0] for s in bench) == {0: 15, 1: 15, 2: 5, 3: 2}
    assert Counter(s.capability for s in bench) == {"perception": 10, "reasoning": 12, "planning": 15}
    assert list(Counter(s.frame_id for s in bench).values()) == [8, 7, 8, 7, 7]
    assert all(len(s.images) == 6 and s.shown_images == [] for s in bench)
    # The prediction yes/no rows (tag [0]) are imported but not judged, as upstream.
    unjudged = [s for s in bench if not judged(s)]
    assert len(unjudged) == 5 and {(s.task, s.kind, scored_tag(s)) for s in unjudged} == {
        ("prediction", "yes/no", 0)
    }


@pytest.mark.shared
def test_export_gives_back_the_release_rows(rows: list[dict[str, Any]], bench: list[Sample]) -> None:
    exported = to_drivebench(bench)
    assert len(exported) == len(rows)
    for original, row in zip(rows, exported, strict=True):
        assert list(row) == list(original)  # same fields, same order
        for key in original:
            assert row[key] == original[key], key
        assert isinstance(row["tag"], list) and row["image_path"]["CAM_FRONT"].startswith(
            "data/nuscenes/samples/"
        )


@pytest.mark.shared
def test_visual_descriptions_reach_the_referencing_samples(bench: list[Sample]) -> None:
    frames = json.loads(DESCRIPTIONS.read_text(encoding="utf-8"))
    described = 0
    for sample in bench:
        keys = frames[sample.scene_id]["key_frames"][sample.frame_id]["key_object_infos"]
        infos = sample.meta.get("object_infos", {})
        assert set(infos) == {str(obj) for obj in sample.objects}  # every object of these frames is described
        for obj in sample.objects:
            (key,) = [k for k in keys if k.startswith(f"<{obj.id},{obj.camera},")]
            assert infos[str(obj)] == keys[key]
            # The pixel key is the same object: its centre / (1600, 900) is the tag's.
            x, y = (float(v) for v in TAG_RE.fullmatch(key).groups()[2:])  # type: ignore[union-attr]
            assert abs(x / 1600 - obj.x) < 1e-3 and abs(y / 900 - obj.y) < 1e-3
            described += 1
    assert described > 0
    moving = bench[1]  # "What is the moving status of object <c1,CAM_BACK,0.5073,0.5778>?"
    assert moving.meta["object_infos"]["<c1,CAM_BACK,0.5073,0.5778>"]["Visual_description"] == "Gray sedan."
    assert (
        "object_infos" not in bench[6].meta
    )  # "In this scenario, what are safe actions ...?" names no object


@pytest.mark.shared
def test_an_undescribed_question_object_is_a_named_error(tmp_path: Path) -> None:
    frames = json.loads(DESCRIPTIONS.read_text(encoding="utf-8"))
    infos = frames["da41ecbc644b4915b84bb732e35ebf8c"]["key_frames"]["7e4c3282bc2a4402b5d1d6705f9eb844"]
    del infos["key_object_infos"]["<c1,CAM_BACK,811.7,520.0>"]
    path = _write(tmp_path / "vd.json", frames)
    with pytest.raises(DataError) as caught:
        import_drivebench(BENCH, None, text_only=True, visual_descriptions=path)
    assert (caught.value.row, caught.value.field) == (1, "question") and "<c1,CAM_BACK" in str(caught.value)
    result = import_drivebench(BENCH, None, text_only=True, visual_descriptions=path, skip_invalid=True)
    # Rows 1, 3, 4, 5 of the first frame ask about c1; row 0 only answers with it (no info attached then).
    assert [e.row for e in result.errors] == [1, 3, 4, 5] and len(result.samples) == 33
    assert "<c1,CAM_BACK,0.5073,0.5778>" not in result.samples[0].meta["object_infos"]


@pytest.mark.shared
def test_missing_images_say_how_many_which_and_where(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    with pytest.raises(DataError) as caught:
        import_drivebench(BENCH, root)
    message = str(caught.value)
    first = root / rows[0]["image_path"]["CAM_FRONT"]
    assert "30 images are not on disk (37 rows)" in message  # 5 frames x 6 cameras
    assert f"the first is {first}" in message
    assert "data/nuscenes/samples/<CAMERA>/<image>.jpg" in message and "--text-only" in message
    # With the first four frames' images in place only the last frame (rows 30-36) is missing.
    for row in rows[:30]:
        for rel in row["image_path"].values():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).touch()
    with pytest.raises(DataError, match=r"6 images are not on disk \(7 rows\)") as caught:
        import_drivebench(BENCH, root)
    assert caught.value.row == 30
    result = import_drivebench(BENCH, root, skip_invalid=True)
    assert len(result.samples) == 30 and [e.row for e in result.errors] == list(range(30, 37))
    assert not any(s.text_only for s in result.samples)


@pytest.mark.shared
def test_cli_text_only_import_validate_and_export(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    args = ["data", "import-drivebench", str(BENCH), "--out", str(out), "--text-only"]
    result = runner.invoke(app, [*args, "--visual-descriptions", str(DESCRIPTIONS)])
    assert result.exit_code == 0, result.output
    assert "wrote 37 samples" in result.output
    result = runner.invoke(app, ["data", "validate", str(out)])  # no image root, no images: text-only
    assert result.exit_code == 0 and "37 valid samples" in result.output and "text only" in result.output
    back = tmp_path / "back.json"
    result = runner.invoke(app, ["data", "export-drivebench", str(out), "--out", str(back)])
    assert result.exit_code == 0, result.output
    assert json.loads(back.read_text(encoding="utf-8")) == rows


@pytest.mark.shared
def test_cli_all_skipped_fails(tmp_path: Path) -> None:
    out = tmp_path / "none.jsonl"
    args = ["data", "import-drivebench", str(BENCH), "--out", str(out), "--image-root", str(tmp_path)]
    result = runner.invoke(app, [*args, "--skip-invalid"])
    assert result.exit_code == 2
    assert "all 37 rows were invalid" in result.output and not out.exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "30 images are not on disk" in result.output


def test_every_importer_fails_when_all_rows_are_skipped(tmp_path: Path) -> None:
    for command, fixture in (
        ("import-drivelm", "drivelm_mini.json"),
        ("import-drivebench", "drivebench_mini.json"),
        ("import-drivekd", "drivekd_mini.json"),
    ):
        out = tmp_path / f"{command}.jsonl"
        args = [str(FIXTURES / fixture), "--out", str(out), "--image-root", str(tmp_path), "--skip-invalid"]
        result = runner.invoke(app, ["data", command, *args])
        assert result.exit_code == 2, (command, result.output)
        assert "nothing to import" in result.output and not out.exists()
        ok = runner.invoke(app, ["data", command, *args[:3], "--text-only"])
        assert ok.exit_code == 0 and out.exists(), (command, ok.output)


def test_an_image_import_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--image-root"):
        import_drivebench(FIXTURES / "drivebench_mini.json", None)


# --- tags and routing ---------------------------------------------------------------------------------------


def _bench_rows() -> list[dict[str, Any]]:
    return json.loads((FIXTURES / "drivebench_mini.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(("tag", "stored"), [(3, [3]), ([3], [3]), ([0, 3], [0, 3])])
def test_tag_list_or_bare_int(tmp_path: Path, tag: Any, stored: list[int]) -> None:
    rows = _bench_rows()
    rows[1]["tag"] = tag
    (sample,) = [
        s
        for s in import_drivebench(_write(tmp_path / "b.json", rows), None, text_only=True).samples
        if s.task == "prediction"
    ]
    assert sample.meta["drivebench_tag"] == stored
    assert scored_tag(sample) == 3 and judged(sample)  # upstream tests 3 before 0 for prediction
    assert to_drivebench([sample])[0]["tag"] == stored


@pytest.mark.parametrize("tag", [[1], [], ["3"], True, [3.0]])
def test_unroutable_or_malformed_tag_is_refused(tmp_path: Path, tag: Any) -> None:
    rows = _bench_rows()
    rows[1]["tag"] = tag
    with pytest.raises(DataError) as caught:
        import_drivebench(_write(tmp_path / "b.json", rows), None, text_only=True)
    assert (caught.value.row, caught.value.field) == (1, "tag")


def test_scored_tag_reads_jsonl_written_with_int_tags() -> None:
    (sample,) = import_drivebench(FIXTURES / "drivebench_mini.json", None, text_only=True).samples[:1]
    legacy = sample.model_copy(update={"meta": {"drivebench_tag": 0}})
    assert scored_tag(legacy) == 0 and judged(legacy)
    assert to_drivebench([legacy])[0]["tag"] == [0]
    plain = sample.model_copy(update={"meta": {}})
    assert scored_tag(plain) == 0  # perception MCQ -> 0 by the exporter's rule


# --- predictions out: DriveBench rows with pred, DriveLM challenge submission -------------------------------


def _predictions(path: Path, answers: dict[str, str]) -> Path:
    with PredictionWriter(path, model="m") as writer:
        for key, text in answers.items():
            writer.write(PredictionRecord(id=key, prediction=text, model="m", new_tokens=1, seconds=0.0))
    return path


def test_export_predictions_as_drivebench_rows(tmp_path: Path) -> None:
    samples = import_drivebench(FIXTURES / "drivebench_mini.json", None, text_only=True).samples
    jsonl = tmp_path / "s.jsonl"
    write_jsonl(samples, jsonl)
    answers = {s.id: f"answer {k}" for k, s in enumerate(samples)}
    pred = _predictions(tmp_path / "pred.jsonl", answers)
    out = tmp_path / "rows.json"
    result = runner.invoke(
        app, ["data", "export-drivebench", str(jsonl), "--out", str(out), "--predictions", str(pred)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [r["pred"] for r in rows] == ["answer 0", "answer 1", "answer 2"]  # replaces the imported pred
    assert [r["tag"] for r in rows] == [[0], [3], [1]]
    partial = _predictions(tmp_path / "partial.jsonl", dict(list(answers.items())[:2]))
    result = runner.invoke(
        app,
        [
            "data",
            "export-drivebench",
            str(jsonl),
            "--out",
            str(out),
            "--predictions",
            str(partial),
            "--overwrite",
        ],
    )
    assert result.exit_code == 2 and "1 of 3 samples have no prediction" in result.output


def test_challenge_ids_count_over_the_four_groups_in_upstream_order(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "drivelm_mini.json").read_text(encoding="utf-8"))
    qa = data["scene1"]["key_frames"]["frame1"]["QA"]
    # The file lists behavior first; the challenge still numbers perception, prediction, planning, behavior.
    data["scene1"]["key_frames"]["frame1"]["QA"] = {
        "behavior": qa["behavior"],
        **{k: v for k, v in qa.items() if k != "behavior"},
    }
    samples = import_drivelm(_write(tmp_path / "lm.json", data), None, text_only=True).samples
    assert challenge_ids(samples) == {
        "scene1_frame1_behavior_0": "scene1_frame1_4",
        "scene1_frame1_perception_0": "scene1_frame1_0",
        "scene1_frame1_perception_1": "scene1_frame1_1",
        "scene1_frame1_prediction_0": "scene1_frame1_2",
        "scene1_frame1_planning_0": "scene1_frame1_3",
        "scene1_frame2_perception_0": "scene1_frame2_0",
        "scene1_frame2_planning_0": "scene1_frame2_1",
    }


@pytest.mark.shared
def test_challenge_ids_of_the_real_test_file(tmp_path: Path) -> None:
    test_eval = SHARED / "drivelm-sample" / "test_eval.json"
    if not test_eval.is_file():
        pytest.skip("shared DriveLM sample not present")
    data = json.loads(test_eval.read_text(encoding="utf-8"))
    samples = import_drivelm(test_eval, None, text_only=True).samples
    # Independent walk of the file as the challenge's evaluation walks it: id -> (question, tag).
    expected: dict[str, tuple[str, list[int]]] = {}
    for scene, scene_data in data.items():
        for frame, frame_data in scene_data["key_frames"].items():
            qa = frame_data["QA"]
            items = qa["perception"] + qa["prediction"] + qa["planning"] + qa["behavior"]
            expected.update(
                {f"{scene}_{frame}_{i}": (item["Q"], item["tag"]) for i, item in enumerate(items)}
            )
    ids = challenge_ids(samples)
    assert sorted(ids.values()) == sorted(expected)
    for sample in samples:
        question, tag = expected[ids[sample.id]]
        _same_up_to_rounding(pixel_tags_in_text(sample.question), question)
        assert sample.meta["drivelm_tag"] == tag
    submission = to_drivelm_submission(samples, {s.id: s.answer for s in samples})
    assert [list(entry) for entry in submission] == [["id", "question", "answer"]] * len(samples)
    gt = {key: data[key.split("_")[0]]["key_frames"][key.split("_")[1]] for key in expected}
    for entry in submission:
        scene, frame, index = entry["id"].split("_")
        qa = gt[entry["id"]]["QA"]
        item = (qa["perception"] + qa["prediction"] + qa["planning"] + qa["behavior"])[int(index)]
        # The ground truth answered back comes out in the challenge's own pixel tags.
        _same_up_to_rounding(entry["answer"], item["A"])


@pytest.mark.shared
def test_challenge_ids_agree_with_the_scorer_reading_the_test_file() -> None:
    from drivekd.evaluation.drivelm_challenge import read_test

    test_eval = SHARED / "drivelm-sample" / "test_eval.json"
    if not test_eval.is_file():
        pytest.skip("shared DriveLM sample not present")
    samples = import_drivelm(test_eval, None, text_only=True).samples
    assert challenge_ids(samples) == {qa.sample_id: qa.id for qa in read_test(test_eval)}


def _same_up_to_rounding(ours: str, theirs: str) -> None:
    """Equal texts whose pixel tags agree to 0.15 px: a tag stored normalised to 4 decimals is off by at most
    0.5e-4 * 1600 = 0.08 px before the one-decimal rounding (0.05 px) of the written pixel value."""
    assert TAG_RE.sub("<tag>", ours) == TAG_RE.sub("<tag>", theirs)
    for a, b in zip(TAG_RE.finditer(ours), TAG_RE.finditer(theirs), strict=True):
        assert a.group(1, 2) == b.group(1, 2)
        assert (
            abs(float(a.group(3)) - float(b.group(3))) <= 0.15
            and abs(float(a.group(4)) - float(b.group(4))) <= 0.15
        )


def test_pixel_tags() -> None:
    # 0.6802 * 1600 = 1088.32, 0.5528 * 900 = 497.52
    assert pixel_tags_in_text("at <c1,CAM_BACK,0.6802,0.5528>.") == "at <c1,CAM_BACK,1088.3,497.5>."


def test_submission_needs_scene_and_frame() -> None:
    (sample,) = import_drivebench(FIXTURES / "drivebench_mini.json", None, text_only=True).samples[:1]
    with pytest.raises(DataError, match="scene and frame"):
        challenge_ids([sample.model_copy(update={"scene_id": ""})])


# --- text-only samples through the readers and the collator --------------------------------------------------


def test_read_jsonl_never_checks_text_only_images(tmp_path: Path) -> None:
    samples = import_drivebench(FIXTURES / "drivebench_mini.json", None, text_only=True).samples
    path = tmp_path / "t.jsonl"
    write_jsonl(samples, path)
    assert all('"text_only":true' in line for line in path.read_text().splitlines())
    assert list(read_jsonl(path, image_root=tmp_path / "nowhere")) == samples
    imaged = [s.model_copy(update={"text_only": False}) for s in samples]
    write_jsonl(imaged, path)
    assert "text_only" not in path.read_text()  # image samples are written as before
    with pytest.raises(DataError, match="image not found"):
        list(read_jsonl(path, image_root=tmp_path / "nowhere"))


def test_text_only_prompt_has_no_images(samples: list[Sample]) -> None:
    text_only = samples[1].model_copy(update={"text_only": True})
    content = build_messages(text_only)[1]["content"]
    assert content == [{"type": "text", "text": text_only.question}]
    assert sum(part["type"] == "image" for part in build_messages(samples[1])[1]["content"]) == 2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "qwen3_vl"])
def test_text_only_batch_carries_no_image(
    family: str, image_dir: Path, samples: list[Sample], tmp_path: Path
) -> None:
    from drivekd.models.pair import build_tiny_pair

    pair = build_tiny_pair(family)
    blind = samples[1].model_copy(
        update={"text_only": True, "images": [{"camera": "CAM_FRONT", "path": "absent.png"}]}
    )
    collate = VLMCollator(
        pair.student_processor, pair.family.image_token_id(pair.student), image_root=image_dir
    )
    alone = collate([blind])
    assert not alone.roles.vision.any() and "pixel_values" not in alone.inputs
    assert pair.student(**alone.inputs).logits.shape[1] == alone.inputs["input_ids"].shape[1]
    mixed = collate([samples[0], blind])
    assert mixed.roles.vision[0].any() and not mixed.roles.vision[1].any()
