"""Issue 13, items 6, 7, 10 and 11: overwrites, image paths confined to the image root, `data validate`, degenerate
counters, and bad command lines that end in one `error:` line (exit 2) instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.collate import VLMCollator
from drivekd.data.drivelm import import_drivelm
from drivekd.data.images import ImageFileError
from drivekd.data.schema import ImageRef, Sample, read_jsonl
from drivekd.errors import DataError
from drivekd.training.config import ConfigError, load_config

pytestmark = pytest.mark.reliability
runner = CliRunner()


def _row(sample_id: str, path: str = "front.png", **changes: Any) -> dict[str, Any]:
    row = {
        "id": sample_id,
        "images": [{"camera": "CAM_FRONT", "path": path}],
        "question": "Is <c1,CAM_FRONT,0.5000,0.5000> moving?",
        "capability": "perception",
        "task": "perception",
        "kind": "yes/no",
        "answer": "No.",
    }
    return {**row, **changes}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A folder with one valid 32x16 PNG and a one-row JSONL that uses it."""
    Image.new("RGB", (32, 16), "red").save(tmp_path / "front.png")
    return _write(tmp_path / "train.jsonl", [_row("s1")])


def _one_error_line(result: Any) -> str:
    """The command failed with exit 2 and said why in one `error:` line, with no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# Item 6: overwrites


def test_import_refuses_its_own_input_and_an_existing_output(tmp_path: Path, shared_drivelm: Path) -> None:
    source = tmp_path / "test_eval.json"
    source.write_bytes((shared_drivelm / "test_eval.json").read_bytes())
    before = source.read_bytes()
    args = ["data", "import-drivelm", str(source), "--image-root", str(shared_drivelm)]
    line = _one_error_line(runner.invoke(app, [*args, "--out", str(source)]))
    assert "is the input file" in line and "--overwrite" in line
    assert source.read_bytes() == before

    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    line = _one_error_line(runner.invoke(app, [*args, "--out", str(out)]))
    assert f"{out} exists" in line
    assert out.read_text() == "keep me\n"
    result = runner.invoke(app, [*args, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(list(read_jsonl(out, image_root=shared_drivelm))) == 66


def test_export_and_synth_refuse_to_replace_existing_files(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "release.json"
    out.write_text("[]")
    _one_error_line(runner.invoke(app, ["data", "export-drivekd", str(data), "--out", str(out)]))
    assert out.read_text() == "[]"
    assert (
        runner.invoke(app, ["data", "export-drivekd", str(data), "--out", str(out), "--overwrite"]).exit_code
        == 0
    )
    assert json.loads(out.read_text())[0]["id"] == "s1"

    synth = ["data", "synth", "--out", str(tmp_path), "--train", "1", "--val", "0", "--test", "0"]
    line = _one_error_line(runner.invoke(app, synth))  # tmp_path holds train.jsonl
    assert "already holds a data set (train.jsonl)" in line
    assert [r["id"] for r in map(json.loads, data.read_text().splitlines())] == ["s1"]


# Item 7: path confinement


@pytest.mark.parametrize("stored", ["../../../../etc/passwd", "/etc/hostname", "link.png"])
def test_image_paths_outside_the_root_are_refused_with_file_row_and_field(data: Path, stored: str) -> None:
    root = data.parent
    (root / "link.png").symlink_to("/etc/hostname")  # a symlink that leads out of the root counts as outside
    bad = _write(root / "bad.jsonl", [_row("s1"), _row("s2", stored)])
    with pytest.raises(DataError) as caught:
        list(read_jsonl(bad))
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(bad), 2, "images.0.path")
    assert "outside the image root" in caught.value.message and "--allow-outside-root" in str(caught.value)
    assert [s.id for s in read_jsonl(bad, allow_outside_root=True)] == ["s1", "s2"]
    with pytest.raises(ImageFileError, match="outside the image root"):
        ImageRef(camera="CAM_FRONT", path=stored).resolve(root)


def test_importer_and_collator_confine_image_paths(tmp_path: Path, shared_drivelm: Path, data: Path) -> None:
    rows = json.loads((shared_drivelm / "test_eval.json").read_text())
    scene = next(iter(rows))
    frame = next(iter(rows[scene]["key_frames"]))
    rows[scene]["key_frames"][frame]["image_paths"]["CAM_FRONT"] = "../../../../etc/passwd"
    source = tmp_path / "trav.json"
    source.write_text(json.dumps(rows))
    with pytest.raises(DataError) as caught:
        import_drivelm(source, shared_drivelm)
    assert caught.value.row == f"{scene}/{frame}" and caught.value.field == "image_paths.CAM_FRONT"

    # The collator opens images only inside its root, even for a sample that did not come through read_jsonl.
    sample = Sample.model_validate(_row("s9", "../../../../etc/passwd"))
    collator = VLMCollator.__new__(VLMCollator)
    collator.image_root, collator.allow_outside_root = data.parent, False
    with pytest.raises(DataError, match="outside the image root"):
        collator._load_image(sample, 0, sample.images[0])


# Item 10: data validate and degenerate counters


def _validate(path: Path) -> Any:
    return runner.invoke(app, ["data", "validate", str(path)])


def test_validate_lists_every_invalid_row_and_exits_1(data: Path) -> None:
    root = data.parent
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    full = (root / "front.png").read_bytes()
    (root / "cut.png").write_bytes(full[: len(full) // 2])
    Image.new("1", (9000, 9000)).save(root / "bomb.png")  # 81 MP: over the 64 MP limit, a few kB on disk
    rows = [
        _row("ok"),
        _row("ok"),  # duplicate id
        _row("tag", question="Where is <c1,CAM_FRONT,0.5,> now?"),
        _row("tag2", answer="It is <c2,CAM_FRONT,0.3,0.4"),  # never closed
        _row("gone", "missing.png"),
        _row("zero", "zero.png"),
        _row("text", "text.png"),
        _row("cut", "cut.png"),
        _row("bomb", "bomb.png"),
    ]
    path = _write(root / "mixed.jsonl", rows)
    with path.open("ab") as handle:
        handle.write(b'{"id": "\xff\xfe"}\n')  # line 10: not UTF-8
    result = _validate(path)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    expected = [
        "row 2, field 'id': duplicate id 'ok' (first on row 1)",
        "row 3, field 'question': malformed object tag",
        "row 4, field 'answer': malformed object tag",
        "row 5, field 'images.0.path': image not found",
        "row zero, field 'images.0.path': image file is empty (0 bytes)",
        "row text, field 'images.0.path': not an image file",
        "row cut, field 'images.0.path': cannot decode image",
        "row bomb, field 'images.0.path': image",
        "row 10: not UTF-8 text",
    ]
    for text in expected:
        assert text in out, text
    assert "81000000 pixels, over the limit" in out
    assert "1 valid samples, 9 invalid" in out


def test_validate_exit_codes_for_valid_empty_and_missing_files(data: Path) -> None:
    assert _validate(data).exit_code == 0
    empty = data.parent / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no rows" in _one_error_line(_validate(empty))
    assert "No such file" in _one_error_line(_validate(data.parent / "nope.jsonl"))


@pytest.mark.parametrize(
    "override", ["run.save_every=0", "run.log_every=0", "optim.max_steps=0", "optim.max_steps=-3"]
)
def test_degenerate_counters_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


# Item 11: one error line, exit 2, before any model loads


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "data.train=nope.jsonl"], "nope.jsonl: cannot read the file"),
        (["train", "data.train=DATA", "model.family=llava"], "unknown model family 'llava'"),
        (
            ["train", "data.train=DATA", "model.student=./no-such-model"],
            "model folder not found: ./no-such-model",
        ),
        (["train", "data.train=EMPTY"], "no samples of the trained capabilities"),
        (["train", "data.train=DATA", "model.dtype=float8"], "model.dtype"),
        (["data", "synth", "--out", "OUT", "--train", "-5"], "--train, --val and --test must be >= 0"),
        (
            ["bench", "step", "--quick", "--device", "tpu"],
            "--device must be cpu, cuda or cuda:<index>, got 'tpu'",
        ),
        (["bench", "step", "--quick", "--dtype", "float8"], "--dtype must be one of"),
        (["bench", "capture", "--quick", "--device", "tpu"], "--device must be cpu"),
        (
            ["cache-teacher", "--teacher", "./no-such-model", "--data", "DATA", "--out", "OUT"],
            "model folder not found",
        ),
        (["models", "tiny", "--out", "OUT", "--family", "llava"], "unknown model family"),
    ],
)
def test_bad_command_lines_end_in_one_error_line(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    names = {"DATA": str(data), "EMPTY": "empty.jsonl", "OUT": str(tmp_path / "out")}
    args = [names.get(a, a).replace("=DATA", f"={data}").replace("=EMPTY", "=empty.jsonl") for a in args]
    line = _one_error_line(runner.invoke(app, args))
    assert says in line
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_bomb_image_in_training_data_is_one_error_line(data: Path, tmp_path: Path) -> None:
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")
    bad = _write(tmp_path / "bomb.jsonl", [_row("bomb", "bomb.png")])
    out = tmp_path / "run"
    line = _one_error_line(runner.invoke(app, ["train", f"data.train={bad}", f"run.output_dir={out}"]))
    assert "row bomb, field 'images.0.path'" in line and "over the limit" in line


def test_offline_hub_id_is_one_error_line(tmp_path: Path, data: Path) -> None:
    """A hub id that is neither cached nor reachable (offline) is refused before any model loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = [f"data.train={data}", "model.student=nobody-here/no-such-model", "model.teacher=null"]
    run = subprocess.run(
        [sys.executable, "-m", "drivekd.cli", "train", *args, "distill.recipe=sft"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "error: cannot load model 'nobody-here/no-such-model'" in " ".join(run.stderr.split())


@pytest.mark.reliability
@pytest.mark.parametrize(
    "command",
    [["bench", "step", "--quick"], ["bench", "capture", "--quick"], ["bench", "inference", "--quick"]],
)
def test_a_benchmark_refuses_an_existing_json_before_it_runs(tmp_path, command):
    """Item 6 for the benchmarks: an existing --json report is kept unless --overwrite, refused in one line before
    any measurement starts."""
    report = tmp_path / "report.json"
    report.write_text('{"earlier": true}')
    result = runner.invoke(app, [*command, "--json", str(report)])
    assert result.exit_code == 2, result.output
    assert "exists; pass --overwrite" in result.output and "--json" in result.output
    assert report.read_text() == '{"earlier": true}'
