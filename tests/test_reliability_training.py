"""Issue 13, data and code safety of training: checkpoints that are corrupt, truncated, incomplete, planted or of the
old format; a config that changed since the run began; teachers of another token layout or family; samples longer
than the model's limit (train and generate). Each test fails on the code before the fix."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.collate import VLMCollator
from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DataError, LayoutMismatchError
from drivekd.evaluation.generate import generate_hf
from drivekd.evaluation.predictions import PredictionWriter, read_predictions
from drivekd.models.pair import build_tiny_pair
from drivekd.training import checkpoint as ckpt
from drivekd.training.checkpoint import CheckpointError
from drivekd.training.config import load_config
from drivekd.training.record import RunRecordError
from drivekd.training.trainer import Trainer

pytestmark = pytest.mark.reliability

RUN = [
    "run.report_to=[]",
    "optim.max_steps=3",
    "optim.grad_accum=1",
    "run.save_every=1",
    "run.keep_checkpoints=3",
    "distill.recipe=multi",  # optimizer, reweighting (with its AdamW), AGP permutations: all in the state
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for the whole module, the module-scoped reference runs included: training is not bitwise
    the same at another thread count (a matmul's blocking changes), so the resumed and uninterrupted runs must
    share it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("train"), n_scenes=3, seed=0, views="single").path


def _config(data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"data.train={data}", f"run.output_dir={out}", *RUN, *overrides])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run with checkpoints 1, 2 and 3."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(_config(data, out)).train()
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "student" / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    one, two = _weights(a), _weights(b)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def _flip(path: Path, size: int = 4096) -> None:
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2
    assert len(raw) >= start + size
    raw[start : start + size] = bytes(b ^ 0xFF for b in raw[start : start + size])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_holds_no_pickle_and_its_manifest_checksums_every_file(straight):
    checkpoint = straight / "checkpoint-2"
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".pickle"))]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert (
        "student/model.safetensors" in manifest["files"] and "trainer_state.safetensors" in manifest["files"]
    )
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest(), name
    state = ckpt.load_state(checkpoint)
    assert state["step"] == 2 and state["reweighter"] is not None and state["optimizer"]["state"]
    assert isinstance(state["rng"]["python"], tuple) and state["rng"]["numpy"][1].dtype.name == "uint32"


DAMAGE = {
    "4 KiB flipped in the trainer state": lambda c: _flip(c / "trainer_state.safetensors"),
    "4 KiB flipped in the HF weights": lambda c: _flip(c / "student" / "model.safetensors"),
    "truncated trainer state": lambda c: (c / "trainer_state.safetensors").write_bytes(
        (c / "trainer_state.safetensors").read_bytes()[:1000]
    ),
    "no manifest (incomplete)": lambda c: (c / "manifest.json").unlink(),
    "a JSON state that says something else": lambda c: (c / "trainer_state.json").write_text(
        (c / "trainer_state.json").read_text().replace('"step": 3', '"step": 1')
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_refused_under_true_and_skipped_under_latest_valid(
    data, straight, tmp_path, damage, capfd
):
    run = _copy(straight, tmp_path / "run")
    DAMAGE[damage](run / "checkpoint-3")
    assert ckpt.problem(run / "checkpoint-3") is not None
    with pytest.raises(CheckpointError, match="checkpoint-3") as refused:
        Trainer(_config(data, run, "run.resume=true")).train()
    assert "latest_valid" in str(refused.value)
    capfd.readouterr()
    result = Trainer(_config(data, run, "run.resume=latest_valid")).train()
    err = capfd.readouterr().err
    assert "skipping" in err and "checkpoint-3" in err and "resuming from checkpoint-2" in err
    assert result.steps == 3
    _assert_same_weights(
        run / "checkpoint-3", straight / "checkpoint-3"
    )  # retrained from step 2, bit for bit
    assert ckpt.problem(run / "checkpoint-3") is None


def test_folders_that_are_not_checkpoint_n_are_never_resumed_and_cause_no_traceback(data, straight, tmp_path):
    run = _copy(straight, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-3")
    for name in ("best", "checkpoint-9x", "checkpoint-", "checkpoint-10.tmp"):
        shutil.copytree(straight / "checkpoint-3", run / name)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    result = Trainer(_config(data, run, "run.resume=true")).train()
    assert result.steps == 3
    _assert_same_weights(run / "checkpoint-3", straight / "checkpoint-3")


class _Payload:
    """Unpickling this creates a folder: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_a_planted_pickle_is_never_loaded_by_resume_nor_executed_by_the_migration(
    data, straight, tmp_path, monkeypatch
):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"step": _Payload(marker)})
    run = _copy(straight, tmp_path / "run")
    (run / "checkpoint-3" / "trainer_state.safetensors").write_bytes(payload)  # in place of the state
    planted = run / "checkpoint-4"  # a newer checkpoint of the old format, state planted
    shutil.copytree(straight / "checkpoint-3" / "student", planted / "student")
    (planted / "trainer_state.pt").write_bytes(payload)
    with monkeypatch.context() as patched:
        _forbid_unpickling(patched)
        with pytest.raises(CheckpointError, match=r"checkpoint-4.*old format.*drivekd migrate-checkpoint"):
            Trainer(_config(data, run, "run.resume=true")).train()
        shutil.rmtree(planted)
        with pytest.raises(CheckpointError, match=r"checkpoint-3.*trainer_state.safetensors"):
            Trainer(_config(data, run, "run.resume=true")).train()
    assert not marker.exists()
    planted.mkdir()
    for protocol, why in ((2, "unsupported GLOBAL posix.mkdir"), (5, "Unsupported operand")):
        (planted / "trainer_state.pt").write_bytes(
            pickle.dumps({"step": _Payload(marker)}, protocol=protocol)
        )
        result = CliRunner().invoke(app, ["migrate-checkpoint", str(planted)])
        output = result.output.replace("\n", "")
        assert result.exit_code == 2 and output.startswith("error:") and why in output, output
        assert "Nothing was run or changed" in output and "Traceback" not in output
        assert not marker.exists()
        assert (planted / "trainer_state.pt").exists() and not (planted / "manifest.json").exists()


def test_an_old_format_checkpoint_names_the_migration_which_converts_it_to_resume_exactly(
    data, straight, tmp_path
):
    run = _copy(straight, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-3")
    old = run / "checkpoint-2"
    torch.save(ckpt.load_state(old), old / "trainer_state.pt")  # what the earlier code wrote (a pickled dict)
    for name in ("trainer_state.safetensors", "trainer_state.json", "manifest.json"):
        (old / name).unlink()
    with pytest.raises(CheckpointError, match=f"drivekd migrate-checkpoint {old}"):
        Trainer(_config(data, run, "run.resume=true")).train()
    result = CliRunner().invoke(app, ["migrate-checkpoint", str(run)])
    assert result.exit_code == 0, result.output
    assert f"converted {old}" in result.output.replace("\n", "")
    assert not (old / "trainer_state.pt").exists() and ckpt.problem(old) is None
    Trainer(_config(data, run, "run.resume=true")).train()
    _assert_same_weights(run / "checkpoint-3", straight / "checkpoint-3")


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        (["optim.lr=1e-3"], ["optim.lr"]),
        (["distill.recipe=perception", "gradients.method=none"], ["distill.recipe", "gradients.method"]),
        (["optim.max_steps=4"], ["optim.max_steps"]),
    ],
)
def test_a_changed_config_refuses_to_resume_and_names_the_keys(data, straight, tmp_path, changes, keys):
    run = _copy(straight, tmp_path / "run")
    record = (run / "config.yaml").read_bytes()
    with pytest.raises(RunRecordError, match="different config") as refused:
        Trainer(_config(data, run, *changes)).train()
    for key in keys:
        assert key in str(refused.value)
    assert "run.log_every" not in str(refused.value)
    assert (run / "config.yaml").read_bytes() == record
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]


def test_resumable_keys_resume_say_so_and_keep_the_record(data, straight, tmp_path, capfd):
    run = _copy(straight, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-3")
    record = (run / "config.yaml").read_bytes()
    capfd.readouterr()
    changed = ["run.log_every=2", "run.save_every=2", "run.keep_checkpoints=4"]
    Trainer(_config(data, run, *changed)).train()
    assert "resuming from checkpoint-2" in capfd.readouterr().err
    _assert_same_weights(run / "checkpoint-3", straight / "checkpoint-3")
    assert (run / "config.yaml").read_bytes() == record
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["resumed_at_step"] == 2
    assert history[-1]["changed"] == {
        "run.keep_checkpoints": [3, 4],
        "run.log_every": [1, 2],
        "run.save_every": [1, 2],
        "run.output_dir": [str(straight), str(run)],  # the run was copied: moving a run is resumable too
    }
    assert yaml.safe_load(record)["run"]["save_every"] == 1


def test_an_unset_output_dir_does_not_continue_another_run(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [f"data.train={data}", *RUN, "optim.max_steps=1", "distill.recipe=sft"]
    Trainer(load_config(overrides=base)).train()
    assert (tmp_path / "runs" / "train" / "checkpoint-1").is_dir()
    with pytest.raises(RunRecordError, match=r"run.output_dir is not set.*optim.lr \(5e-05 -> 0.001\)"):
        Trainer(load_config(overrides=[*base, "optim.lr=1e-3"]))
    with pytest.raises(RunRecordError, match=r"run\.resume=false would overwrite"):
        Trainer(load_config(overrides=[*base, "run.resume=false"]))


# ---- token layout ------------------------------------------------------------------------------------------------
def test_a_teacher_of_another_token_layout_is_refused_before_any_step(data, tmp_path):
    folder = build_tiny_pair("qwen2_5_vl", image_size=(56, 56)).save(tmp_path / "pair")  # fewer vision tokens
    out = tmp_path / "run"
    with pytest.raises(LayoutMismatchError, match=r"tokenise sample .* differently"):
        Trainer(_config(data, out, f"model.teacher={folder / 'teacher'}"))
    assert not (out / "log.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_a_teacher_of_another_family_is_one_error_line(data, tmp_path):
    folder = build_tiny_pair("internvl").save(tmp_path / "pair")
    out = tmp_path / "run"
    args = [
        "train",
        f"data.train={data}",
        f"run.output_dir={out}",
        *RUN,
        f"model.teacher={folder / 'teacher'}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "internvl" in lines[0], result.output
    assert not (out / "log.jsonl").exists()


# ---- length limit ------------------------------------------------------------------------------------------------
def _lengths(data: Path, with_answer: bool, extra: int = 0) -> dict[str, int]:
    pair = build_tiny_pair("qwen2_5_vl")
    collate = VLMCollator(
        pair.student_processor,
        pair.family.image_token_id(pair.student),
        image_root=data.parent,
        with_answer=with_answer,
    )
    return {s.id: collate([s]).inputs["input_ids"].shape[1] + extra for s in read_jsonl(data)}


def test_overlong_samples_are_refused_or_skipped_and_named_in_train(data, tmp_path):
    lengths = _lengths(data, with_answer=True)
    limit = sorted(lengths.values())[len(lengths) // 2]
    over = [i for i, n in lengths.items() if n > limit]
    assert over and len(over) < len(lengths)
    settings = ["distill.recipe=sft", "optim.max_steps=1", f"data.max_length={limit}"]
    with pytest.raises(DataError, match=f"row {over[0]}.*{lengths[over[0]]} tokens long.*limit of {limit}"):
        Trainer(_config(data, tmp_path / "refuse", *settings))
    trainer = Trainer(_config(data, tmp_path / "skip", *settings, "data.overlong=skip"))
    assert trainer.lengths.skipped == [(i, lengths[i]) for i in over]
    assert not {s.id for s in trainer.samples} & set(over)
    assert trainer.train().lengths.as_json()["overlong_skipped"][0] == {
        "id": over[0],
        "tokens": lengths[over[0]],
    }
    default = Trainer(_config(data, tmp_path / "default", "distill.recipe=sft", "optim.max_steps=1"))
    assert default.lengths.limit == default.models.student.config.text_config.max_position_embeddings
    assert not default.lengths.skipped


def test_overlong_samples_are_refused_or_skipped_in_generate(data, tmp_path):
    pair = build_tiny_pair("qwen2_5_vl")
    lengths = _lengths(data, with_answer=False, extra=4)  # prompt tokens + the tokens to generate
    limit = sorted(lengths.values())[len(lengths) // 2]
    over = [i for i, n in lengths.items() if n > limit]
    samples = list(read_jsonl(data))

    def generate(path: Path, **kwargs):
        with PredictionWriter(path, model="tiny") as writer:
            return generate_hf(
                samples,
                pair.student,
                pair.student_processor,
                writer,
                image_root=data.parent,
                max_new_tokens=4,
                progress=False,
                max_length=limit,
                **kwargs,
            )

    with pytest.raises(DataError, match=f"row {over[0]}.*including 4 tokens to generate"):
        generate(tmp_path / "refused.jsonl")
    assert not read_predictions(tmp_path / "refused.jsonl")  # refused before anything was generated
    summary = generate(tmp_path / "skipped.jsonl", overlong="skip")
    assert summary.overlong == [(i, lengths[i]) for i in over] and summary.max_length == limit
    assert set(read_predictions(tmp_path / "skipped.jsonl")) == set(lengths) - set(over)


def test_a_cache_written_with_another_token_layout_is_refused_before_any_step(data, tmp_path):
    from drivekd.signals.cache import write_cache
    from drivekd.signals.live import LiveTeacher
    from drivekd.signals.types import SignalNeeds

    other = build_tiny_pair("qwen2_5_vl", image_size=(56, 56))  # its processor gives fewer vision tokens
    collate = VLMCollator(
        other.teacher_processor, other.family.image_token_id(other.teacher), image_root=data.parent
    )
    needs = SignalNeeds(tv_layers=frozenset({0, 1}), full_layers=frozenset())
    write_cache(
        LiveTeacher(other.teacher),
        list(read_jsonl(data)),
        collate,
        tmp_path / "cache",
        needs=needs,
        batch_size=4,
        teacher_name="other",
        dtype=torch.float32,
    )
    out = tmp_path / "run"
    with pytest.raises(LayoutMismatchError, match="differently from the teacher that wrote cache"):
        Trainer(_config(data, out, f"model.cache={tmp_path / 'cache'}", "distill.recipe=perception"))
    assert not (out / "log.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_overlong_samples_are_refused_or_skipped_in_cache_teacher(data, tmp_path):
    lengths = _lengths(data, with_answer=True)  # the tiny teacher shares the student's processor
    limit = sorted(lengths.values())[len(lengths) // 2]
    over = [i for i, n in lengths.items() if n > limit]
    args = ["cache-teacher", "--teacher", "tiny:qwen2_5_vl", "--data", str(data), "--max-length", str(limit)]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and refused.output.startswith("error:"), refused.output
    assert f"row {over[0]}" in refused.output and "--overlong skip" in refused.output
    assert not (tmp_path / "refused" / "index.json").exists()
    skipped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "skipped"), "--overlong", "skip"])
    assert skipped.exit_code == 0, skipped.output
    assert f"skipped {len(over)} rows over the limit of {limit} tokens: {over[0]}" in skipped.output
    index = json.loads((tmp_path / "skipped" / "index.json").read_text())
    assert set(index["samples"]) == set(lengths) - set(over)


def test_overlong_samples_are_refused_or_skipped_in_analyze(data):
    from drivekd.analysis.dataset import load_prestudy
    from drivekd.analysis.runner import AnalysisOptions, analyze

    pair = build_tiny_pair("qwen2_5_vl")
    lengths = _lengths(data, with_answer=True)
    limit = sorted(lengths.values())[len(lengths) // 2]
    over = [i for i, n in lengths.items() if n > limit]
    prestudy = load_prestudy(data)

    def run(overlong: str) -> dict:
        options = AnalysisOptions(max_length=limit, overlong=overlong, dispersion_questions=2)
        return analyze(pair.student, pair.student_processor, pair.family, prestudy, options=options)

    with pytest.raises(DataError, match=f"row {over[0]}.*tokens long.*limit of {limit}"):
        run("refuse")
    report = run("skip")["data"]
    assert report["samples"] == len(lengths) - len(over)
    assert [row["id"] for row in report["lengths"]["overlong_skipped"]] == over


# ---- small gaps --------------------------------------------------------------------------------------------------
def test_train_confines_images_to_the_image_root_unless_allowed(data, tmp_path):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        for image in row["images"]:
            image["path"] = str((data.parent / image["path"]).resolve())  # absolute: outside any other root
    moved = tmp_path / "elsewhere" / "train.jsonl"
    moved.parent.mkdir()
    moved.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = ["distill.recipe=sft", "optim.max_steps=1"]
    with pytest.raises(DataError, match="outside"):
        Trainer(
            load_config(
                overrides=[f"data.train={moved}", f"run.output_dir={tmp_path / 'a'}", *RUN, *settings]
            )
        )
    allowed = [f"data.train={moved}", f"run.output_dir={tmp_path / 'b'}", *RUN, *settings]
    assert Trainer(load_config(overrides=[*allowed, "data.allow_outside_root=true"])).samples


def test_generation_images_are_confined_and_read_with_checks(data, tmp_path):
    from drivekd.evaluation.generate import load_images

    sample = next(iter(read_jsonl(data)))
    assert load_images(sample, data.parent)  # inside the root: read
    image = sample.images[0]
    escaped = sample.model_copy(
        update={"images": [image.model_copy(update={"path": "../" * 12 + "etc/passwd"})]}
    )
    with pytest.raises(DataError, match="outside the image root"):
        load_images(escaped, data.parent)
    (tmp_path / image.path).parent.mkdir(parents=True)
    (tmp_path / image.path).write_bytes(b"not an image")
    with pytest.raises(DataError, match="not an image file"):
        load_images(sample, tmp_path)


def test_demo_teacher_judge_means_leave_out_failed_gradings():
    from drivekd.data.schema import ImageRef, Sample
    from drivekd.demo.teacher import per_question_type

    def sample(sid: str) -> Sample:
        image = ImageRef(camera="CAM_FRONT", path="a.png")
        return Sample(
            id=sid,
            images=[image],
            question="q?",
            capability="planning",
            task="planning",
            kind="open",
            answer="Brake.",
            meta={"question_type": "safe_action"},
        )

    judged = [{"id": "o1", "scores": [80.0, None]}, {"id": "o2", "scores": [None, None]}]
    rows = per_question_type([sample("o1"), sample("o2")], {"o1": "Brake.", "o2": "Go."}, judged)
    assert rows["safe_action"]["judge"] == 80.0  # o1's one grade; o2 was never graded


# ---- SIGKILL -----------------------------------------------------------------------------------------------------
# `drivekd train` in a child process; with a kill point it SIGKILLs itself on the given call of a checkpoint-writing
# function, which stops the write at a known place instead of at a moment that depends on timing.
_CHILD = """
import os, signal, sys
from drivekd.training import checkpoint, statefile
module, name, call = sys.argv[1], sys.argv[2], int(sys.argv[3])
if name:
    target = {"checkpoint": checkpoint, "statefile": statefile}[module]
    real, calls = getattr(target, name), []
    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(target, name, killing)
from drivekd.cli import app
app(sys.argv[4:], prog_name="drivekd")
"""


def _child(data: Path, out: Path, kill: tuple[str, str, int] = ("", "", 0)) -> subprocess.Popen:
    args = ["train", f"data.train={data}", f"run.output_dir={out}", *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _CHILD, kill[0], kill[1], str(kill[2]), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def straight_cli(data, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run of `drivekd train` in a child process (as the killed runs are)."""
    out = tmp_path_factory.mktemp("straight-cli")
    _finish(_child(data, out))
    return out


def _assert_resumed_equal(data: Path, straight: Path, run: Path) -> None:
    output = _finish(_child(data, run))
    assert "resuming from checkpoint-" in output, output[-2000:]
    _assert_same_weights(run / "checkpoint-3", straight / "checkpoint-3")
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_sigkill_during_training_resumes_to_bitwise_equal_weights(data, straight_cli, tmp_path):
    run = tmp_path / "killed"
    child = _child(data, run)
    deadline = time.time() + 600
    while not (run / "checkpoint-1").is_dir():
        assert child.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not (run / "checkpoint-3").exists()
    _assert_resumed_equal(data, straight_cli, run)


@pytest.mark.parametrize(
    "kill",
    [("statefile", "save_state", 2), ("checkpoint", "write_manifest", 2)],
    ids=["before the trainer state of checkpoint-2", "before the manifest of checkpoint-2"],
)
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    data, straight_cli, tmp_path, kill
):
    run = tmp_path / "killed"
    child = _child(data, run, kill)
    assert child.wait(timeout=600) == -signal.SIGKILL
    assert (run / "checkpoint-2.tmp").is_dir() and not (run / "checkpoint-2").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]
    _assert_resumed_equal(data, straight_cli, run)
    assert not (run / "checkpoint-2.tmp").exists()
