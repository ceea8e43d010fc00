"""The sample schema, object tags, JSONL I/O and the text-to-vision index."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.data.roles import TVIndex
from drivekd.data.schema import Sample, read_jsonl, write_jsonl
from drivekd.data.tags import normalise_tags_in_text, parse_tags
from drivekd.errors import DataError

ROW = {
    "id": "s1",
    "images": [{"camera": "CAM_FRONT", "path": "noise.png"}],
    "question": "Q <c1,CAM_FRONT,0.1,0.2>?",
    "answer": "A",
    "capability": "perception",
    "task": "perception",
    "kind": "mcq",
    "options": {"A": "x", "B": "y"},
    "objects": [{"id": "c1", "camera": "CAM_FRONT", "x": 0.1, "y": 0.2}],
}


def test_tags_pixel_to_normalised():
    text = "Is <c1,CAM_BACK,1088.3,497.5> moving? And <c2,CAM_FRONT,0,900>."
    assert (
        normalise_tags_in_text(text)
        == "Is <c1,CAM_BACK,0.6802,0.5528> moving? And <c2,CAM_FRONT,0.0000,1.0000>."
    )
    tags = parse_tags(text, pixel_size=(1600, 900))
    assert [(t.id, t.camera, t.x, t.y) for t in tags] == [
        ("c1", "CAM_BACK", 0.6802, 0.5528),
        ("c2", "CAM_FRONT", 0.0, 1.0),
    ]
    assert parse_tags("<c3,CAM.FRONT,0.4755,0.5231>")[0].camera == "CAM_FRONT"  # DriveBench spelling


@pytest.mark.parametrize("bad", ["<c1,CAM_FRONT,abc>", "<c1,CAM_TOP,0.1,0.2>", "<c1,CAM_FRONT,1.5,0.2>"])
def test_bad_tags_are_errors(bad):
    with pytest.raises(ValueError):
        parse_tags(bad)


def test_jsonl_round_trip_and_named_errors(tmp_path, image_dir):
    samples = [
        Sample.model_validate(ROW),
        Sample.model_validate({**ROW, "id": "s2", "kind": "open", "options": None}),
    ]
    path = tmp_path / "data.jsonl"
    assert write_jsonl(samples, path) == 2
    assert list(read_jsonl(path, image_root=image_dir)) == samples
    bad_rows = [
        {**ROW, "task": "prediction"},  # prediction belongs to reasoning
        {**ROW, "answer": "E"},
        {**ROW, "images": [{"camera": "CAM_TOP", "path": "noise.png"}]},
        {**ROW, "images": [{"camera": "CAM_FRONT", "path": "missing.png"}]},
        {k: v for k, v in ROW.items() if k != "question"},
    ]
    lines = [json.dumps(ROW)] + [json.dumps(r) for r in bad_rows] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        list(read_jsonl(path, image_root=image_dir))
    assert str(err.value).startswith(f"{path}, row 2, field 'task': task 'prediction' belongs to capability")
    errors: list[DataError] = []
    kept = list(read_jsonl(path, image_root=image_dir, skip_invalid=True, errors=errors))
    assert [s.id for s in kept] == ["s1"]
    assert [(e.row, e.field) for e in errors] == [
        (2, "task"),
        (3, "answer"),
        (4, "images.0.camera"),
        (5, "images.0.path"),
        (6, "question"),
        (7, None),
    ]
    assert all(str(e).startswith(str(path)) for e in errors)


def _naive_block(maps, text, vision, skip_leading):
    out = []
    for b in range(maps.shape[0]):
        first_vision = int(vision[b].nonzero().min()) if vision[b].any() else maps.shape[1]
        rows = [i for i in range(maps.shape[1]) if text[b, i] and (not skip_leading or i > first_vision)]
        cols = [j for j in range(maps.shape[1]) if vision[b, j]]
        out.append(maps[b][rows][:, cols])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 12), st.data())
def test_tv_index_gathers_the_text_to_vision_block(batch, length, data):
    roles = data.draw(
        st.lists(
            st.lists(st.sampled_from("tvs"), min_size=length, max_size=length), min_size=batch, max_size=batch
        )
    )
    text = torch.tensor([[r == "t" for r in row] for row in roles])
    vision = torch.tensor([[r == "v" for r in row] for row in roles])
    maps = torch.rand(batch, length, length)
    for skip_leading in (True, False):
        index = TVIndex.from_masks(text, vision, skip_leading=skip_leading)
        block = index.gather(maps)
        assert torch.equal(index.text_count, text.sum(1)) and torch.equal(index.vision_count, vision.sum(1))
        for b, expected in enumerate(_naive_block(maps, text, vision, skip_leading)):
            rows, cols = expected.shape
            assert torch.equal(block[b, :rows, :cols], expected)
            assert block[b, rows:].abs().sum() == 0 and block[b, :, cols:].abs().sum() == 0
