"""The image root a JSONL records (issue 14, item 5): imports write it in a header line, every later command uses it
unless given ``--image-root``, headerless files read from their folder, and a bad header is a named error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.header import image_root_for
from drivekd.data.schema import Sample, read_jsonl, write_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DataError
from drivekd.evaluation.inputs import load_samples
from drivekd.training.config import load_config
from drivekd.training.trainer import Trainer

runner = CliRunner()


def _header(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])["drivekd_header"]


def _validate(*args: str) -> tuple[int, str]:
    """Exit code and output (whitespace collapsed: the summary table wraps) of ``drivekd data validate``."""
    result = runner.invoke(app, ["data", "validate", *args])
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A synthetic train split: its JSONL (no header) beside images/."""
    return generate_split(tmp_path_factory.mktemp("synth"), n_scenes=2, seed=0, views="single").path


@pytest.mark.shared
def test_an_import_records_its_root_and_later_commands_find_the_images(tmp_path, shared_drivelm):
    out = tmp_path / "runs" / "eval.jsonl"
    args = ["data", "import-drivelm", str(shared_drivelm / "test_eval.json"), "--out", str(out)]
    result = runner.invoke(app, [*args, "--image-root", str(shared_drivelm)])
    assert result.exit_code == 0, result.output
    assert _header(out) == {"image_root": str(shared_drivelm.resolve())}  # outside runs/: absolute
    assert all("drivekd_header" not in line and ".." not in line for line in out.read_text().splitlines()[1:])

    code, output = _validate(str(out))  # no --image-root
    assert code == 0 and "66 valid samples, 0 invalid" in output, output
    assert f"image root: {shared_drivelm.resolve()}" in output
    assert image_root_for(out) == shared_drivelm.resolve()
    assert len(list(read_jsonl(out))) == 66
    samples, root = load_samples(out)  # what eval generate / score read
    assert (len(samples), root) == (66, shared_drivelm.resolve())
    bench = tmp_path / "bench.json"
    result = runner.invoke(app, ["data", "export-drivebench", str(out), "--out", str(bench)])
    assert result.exit_code == 0, result.output

    code, output = _validate(str(out), "--image-root", str(tmp_path))  # an explicit root wins
    assert code == 1 and "66 invalid" in output and "image not found" in output

    text_only = tmp_path / "text.jsonl"
    assert runner.invoke(app, [*args[:3], "--out", str(text_only), "--text-only"]).exit_code == 0
    assert "drivekd_header" not in text_only.read_text()  # no root to record


def test_a_root_inside_the_folder_is_recorded_relative_so_the_folder_can_move(tmp_path, synth):
    """Relative (no ..) when the root is the JSONL's folder or under it; absolute otherwise."""
    samples = list(read_jsonl(synth))
    folder = tmp_path / "set"
    shutil.copytree(synth.parent / "images", folder / "pictures" / "images")
    write_jsonl(samples, tmp_path / "lists" / "train.jsonl", image_root=folder / "pictures")
    assert _header(tmp_path / "lists" / "train.jsonl") == {"image_root": str((folder / "pictures").resolve())}
    write_jsonl(samples, folder / "train.jsonl", image_root=folder / "pictures")
    assert _header(folder / "train.jsonl") == {"image_root": "pictures"}

    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    assert list(read_jsonl(moved / "train.jsonl")) == samples
    assert image_root_for(moved / "train.jsonl") == moved / "pictures"


def test_training_uses_the_recorded_root(tmp_path, synth):
    data = tmp_path / "lists" / "train.jsonl"
    write_jsonl(read_jsonl(synth), data, image_root=synth.parent)
    config = load_config(
        overrides=[f"data.train={data}", f"run.output_dir={tmp_path / 'run'}", "run.report_to=[]"]
    )
    trainer = Trainer(config)  # reads the data and collates every sample's layout
    assert trainer.collate.image_root == synth.parent.resolve()
    assert len(trainer.samples) == len(list(read_jsonl(synth)))


def test_a_file_without_a_header_reads_from_its_folder(synth):
    assert "drivekd_header" not in synth.read_text()  # synthetic data: images under the JSONL's folder
    assert image_root_for(synth) == synth.parent
    code, output = _validate(str(synth))
    assert code == 0 and "0 invalid" in output, output


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"image_root": "no-such-folder"}, "the recorded image root 'no-such-folder' is not a folder"),
        ({"image_root": 3}, "must be a folder path, got 3"),
        ({"image_root": ""}, "must be a folder path, got ''"),
    ],
)
def test_a_bad_recorded_root_names_the_file_and_field(tmp_path, synth, header, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"drivekd_header": header}) + "\n" + synth.read_text())
    with pytest.raises(DataError, match=r"field 'drivekd_header\.image_root'") as err:
        list(read_jsonl(bad))
    assert err.value.file == str(bad) and err.value.row == 1 and message in err.value.message
    code, output = _validate(str(bad))
    assert code == 2 and f"{bad}, row 1, field 'drivekd_header.image_root'" in output, output
    assert list(read_jsonl(bad, image_root=synth.parent)) == list(read_jsonl(synth))  # an explicit root wins


def test_a_header_must_be_an_object_on_the_first_line(tmp_path, synth):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"drivekd_header": "here"}) + "\n")
    with pytest.raises(DataError, match="row 1, field 'drivekd_header': must be a JSON object"):
        image_root_for(bad)
    late = tmp_path / "late.jsonl"
    lines = synth.read_text().splitlines(keepends=True)
    late.write_text(lines[0] + json.dumps({"drivekd_header": {"image_root": "."}}) + "\n")
    with pytest.raises(
        DataError, match="row 2, field 'drivekd_header': a header belongs on the first line only"
    ):
        list(read_jsonl(late, image_root=synth.parent))


def test_image_paths_stay_confined_to_the_recorded_root(tmp_path, synth, samples: list[Sample]):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "noise.png").write_bytes(b"")  # beside the root, reachable only through ..
    row = {**samples[0].model_dump(), "images": [{"camera": "CAM_FRONT", "path": "../noise.png"}]}
    escaping = Sample.model_validate(row)
    data = tmp_path / "lists" / "escape.jsonl"
    write_jsonl([escaping], data, image_root=root)
    with pytest.raises(DataError, match="outside the image root"):
        list(read_jsonl(data))


def test_reading_without_images_needs_no_recorded_folder(tmp_path, synth):
    """Scoring reads rows only: a recorded root that has gone away does not stop it."""
    gone = tmp_path / "gone.jsonl"
    gone.write_text(json.dumps({"drivekd_header": {"image_root": "moved-away"}}) + "\n" + synth.read_text())
    assert list(read_jsonl(gone, check_files=False)) == list(read_jsonl(synth))
    samples, _ = load_samples(gone, check_files=False)
    assert len(samples) == len(list(read_jsonl(synth)))
    with pytest.raises(DataError, match="not a folder"):
        load_samples(gone)
