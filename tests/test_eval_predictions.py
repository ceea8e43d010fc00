"""Prediction records: append, resume, a crash-truncated last line, and named errors for bad files."""

from __future__ import annotations

import pytest

from drivekd.errors import DataError
from drivekd.evaluation.predictions import PredictionRecord, PredictionWriter, read_predictions


def _record(sample_id: str, text: str = "B. Stopped.") -> PredictionRecord:
    return PredictionRecord(id=sample_id, prediction=text, model="m", new_tokens=3, seconds=0.5)


def test_write_read_and_resume(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path, model="m") as writer:
        writer.write(_record("a"))
        writer.write(_record("b", "Keep going. Then stop."))
    with PredictionWriter(path, model="m") as writer:
        assert writer.done == {"a", "b"}
        with pytest.raises(ValueError, match="already"):
            writer.write(_record("a"))
        writer.write(_record("c"))
    records = read_predictions(path)
    assert list(records) == ["a", "b", "c"]
    assert records["b"] == _record("b", "Keep going. Then stop.")


def test_a_truncated_last_line_is_moved_aside_and_regenerated(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path, model="m") as writer:
        writer.write(_record("a"))
    complete = path.read_text()
    partial = _record("b").model_dump_json()[:25]
    with path.open("a") as handle:
        handle.write(partial)  # the crash happened mid-line
    with PredictionWriter(path, model="m") as writer:
        assert writer.done == {"a"}
        writer.write(_record("b"))
    assert path.read_text() == complete + _record("b").model_dump_json() + "\n"
    assert (tmp_path / "preds.jsonl.truncated").read_text() == partial + "\n"


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(_record("a").model_dump_json())
    with PredictionWriter(path, model="m") as writer:
        assert writer.done == {"a"}
        writer.write(_record("b"))
    assert list(read_predictions(path)) == ["a", "b"]
    assert not (tmp_path / "preds.jsonl.truncated").exists()


def test_bad_files_are_named_errors(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(_record("a").model_dump_json() + "\n{oops\n")
    with pytest.raises(DataError, match="row 2") as err:
        read_predictions(path)
    assert "not valid JSON" in str(err.value)
    path.write_text(_record("a").model_dump_json() + "\n" + _record("a").model_dump_json() + "\n")
    with pytest.raises(DataError, match="already appears on line 1"):
        read_predictions(path)
    path.write_text('{"id": "a", "prediction": "B", "model": "m", "new_tokens": -1, "seconds": 0}\n')
    with pytest.raises(DataError, match="field 'new_tokens'"):
        read_predictions(path)


def test_a_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "preds.jsonl"
    with PredictionWriter(path, model="m") as writer:
        writer.write(_record("a"))
    with pytest.raises(DataError, match="holds predictions of m"):
        PredictionWriter(path, model="other")
