"""The training loop, one test per feature: config, recipes, normalisation, AGP, reweighting, NaN handling,
checkpoint/resume after SIGKILL, logs, LoRA, data parallelism and FSDP."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.data.collate import VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DriveKDError
from drivekd.models.pair import build_tiny_pair
from drivekd.signals.live import LiveTeacher
from drivekd.training.config import ConfigError, load_config
from drivekd.training.objective import Objective, TermValue
from drivekd.training.recipes import build_recipe, resolve_layers
from drivekd.training.trainer import Trainer, TrainingError

QUIET = ["run.report_to=[]", "run.resume=false", "run.save_every=1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("train"), n_scenes=3, seed=0, views="single").path


def _config(data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"data.train={data}", f"run.output_dir={out}", *QUIET, *overrides])


def test_config_yaml_overrides_and_named_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\ndistill:\n  recipe: perception\n")
    config = load_config(path, ["optim.grad_accum=2", "layers.student.reasoning=[2, 3]"])
    assert (
        config.optim.lr == 1e-4 and config.optim.grad_accum == 2 and config.layers.student.reasoning == (2, 3)
    )
    assert config.gradients.method == "none"  # single-teacher runs use no projection (paper 3.3.1)
    assert load_config().gradients.method == "agp" and load_config().optim.warmup_ratio == 0.03
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match=re.escape("config key 'optim.grad_accum'")):
        load_config(overrides=["optim.grad_accum=0"])
    with pytest.raises(ConfigError, match=re.escape("needs distill.recipe=multi")):
        load_config(overrides=["distill.recipe=planning", "gradients.method=agp"])
    with pytest.raises(ConfigError, match=re.escape("config key 'distill.pi'")):
        load_config(overrides=["distill.pi=[[1, 0], [0, 1]]"])


def test_layer_resolution_follows_the_paper_and_its_variants():
    config = load_config()
    layers = resolve_layers(config.layers, student_depth=4, teacher_depth=6)
    assert layers.student == {"perception": [0], "reasoning": [0, 1, 2], "planning": [2]}
    # Section 3.3.2: M = 5 teacher layers, K = 3 student layers, g = 3, sliding groups (0-based indices here).
    assert layers.teacher["reasoning"] == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert layers.teacher["planning"] == [[4]] and layers.teacher["perception"] == [[0]]
    variant = load_config(overrides=["layers.student.reasoning=[2, 2]", "layers.teacher.reasoning=[2, 4]"])
    assert resolve_layers(variant.layers, 4, 6).student["reasoning"] == [1]
    with pytest.raises(ValueError, match=re.escape("1..3")):
        resolve_layers(load_config(overrides=["layers.student.planning=4"]).layers, 4, 6)


@pytest.mark.parametrize(("pooled", "metric"), [(False, "mse"), (True, "mse"), (True, "cosine")])
def test_window_normalisation_equals_one_large_batch(data, pooled, metric):
    """Terms of two micro-batches, normalised over the window, sum to the terms of their union as one batch
    (per capability, or pooled over all capabilities as with the mixed sampler; the cosine full-map term is a
    mean over samples, so splitting the batch must not weigh longer samples more)."""
    pair = build_tiny_pair("qwen2_5_vl")
    config = load_config(overrides=[f"distill.metric={metric}"])
    layers = resolve_layers(config.layers, 4, 6)
    objective = Objective(build_recipe(config.distill, layers, 4, 6).terms, pooled=pooled)
    teacher = LiveTeacher(pair.teacher)
    samples = list(read_jsonl(data))
    picked = [next(s for s in samples if s.capability == c) for c in ("perception", "reasoning", "planning")]
    picked += [next(s for s in reversed(samples) if s.capability == c) for c in ("perception", "reasoning")]
    collate = VLMCollator(
        pair.student_processor, pair.family.image_token_id(pair.student), image_root=data.parent
    )
    student = pair.student.double()
    teacher.model.double()

    def terms_of(batches):
        for batch in batches:
            batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
        indexed = [(batch, TVIndex.from_masks(batch.roles.text, batch.roles.vision)) for batch in batches]
        window = objective.window(indexed)
        totals: Counter = Counter()
        from drivekd.capture.recorder import AttentionRecorder, use_capture_attention

        use_capture_attention(student)
        for batch, index in indexed:
            signals = teacher.signals(batch, index, objective.needs)
            with AttentionRecorder(student, objective.plan, grad=True) as rec:
                rec.start(index)
                out = student(**batch.inputs)
                captured = rec.collect()
            sources = dict.fromkeys(("perception", "reasoning", "planning"), signals)
            for term in objective.values(batch, index, out.logits, sources, window, captured=captured):
                totals[term.name if pooled else (term.name, term.capability)] += float(term.value)
        return totals

    split = terms_of([collate(picked[:3]), collate(picked[3:])])
    whole = terms_of([collate(picked)])
    assert split.keys() == whole.keys() and len(split) == (4 if pooled else 12)
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key


def test_the_mixed_sampler_is_one_shuffled_pass_per_epoch_and_splits_ranks_exactly(data):
    from drivekd.training.sampling import MixedSampler

    samples = list(read_jsonl(data))
    one = MixedSampler(samples, per_step=2, seed=3)
    epoch = [s.id for _ in range(one.micro_steps_per_epoch()) for s in one.next()]
    assert sorted(epoch[: len(samples)]) == sorted(s.id for s in samples)  # every sample once per pass
    assert len({s.capability for s in samples}) == 3  # capabilities mixed in one order
    ranks = [MixedSampler(samples, per_step=1, seed=3, rank=r, world=2) for r in range(2)]
    together = MixedSampler(samples, per_step=2, seed=3)
    for _ in range(5):
        step = together.next()
        assert [s.id for s in step] == [ranks[0].next()[0].id, ranks[1].next()[0].id]
    state = together.state_dict()
    resumed = MixedSampler(samples, per_step=2, seed=3)
    resumed.load_state_dict(state)
    assert [s.id for s in resumed.next()] == [s.id for s in together.next()]


def test_config_holes_are_named_errors(data, tmp_path):
    cases = {
        ("distill.recipe=kl", "model.cache=runs/cache"): "a teacher-signal cache does not hold",
        ("distill.recipe=hidden", "model.cache=runs/cache"): "hidden states, which a teacher-signal cache",
        ("distill.recipe=sft", "gradients.method=g1"): "g1 projects teacher terms",
        ("gradients.grouping=capability",): "needs data.sampler=per_capability",
        ("model.dtype=bfloat16",): "no fp32 master copy",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=list(overrides))
    assert load_config(overrides=["distill.hidden_layer=1"]).distill.hidden_layer == "1"  # not an int
    assert load_config(overrides=["reweight.mode=reference"]).reweight.bounds == (1e-6, 1e6)


def test_paper_reweighting_takes_decay_and_norm_from_the_pi_mixed_loss(data, tmp_path, monkeypatch):
    """Both inputs of each weight's update come from the loss the weight multiplies: sum_c pi_{c,t} L_t(c)."""
    config = _config(
        data, tmp_path, "optim.grad_accum=1", "data.sampler=per_capability", "reweight.enabled=true"
    )
    trainer = Trainer(config)
    seen = {}
    real = trainer.reweighter.update

    def spy(losses, norms):
        seen.update(losses=losses, norms=norms)
        return real(losses, norms)

    accumulate = trainer.accumulate

    def keep(*args, **kwargs):
        seen["steps"] = accumulate(*args, **kwargs)
        return seen["steps"]

    monkeypatch.setattr(trainer.reweighter, "update", spy)
    monkeypatch.setattr(trainer, "accumulate", keep)
    trainer.train_step()
    steps = seen["steps"]
    caps = ["perception", "reasoning", "planning"]
    pi = config.distill.pi
    values = {(t.name, t.capability): float(t.value) for t in steps[0].terms}
    for t in caps:
        mixed = sum(pi[caps.index(c)][caps.index(t)] * values[t, c] for c in caps)
        assert seen["losses"][t] == pytest.approx(mixed, rel=1e-9)
    assert seen["losses"]["ce"] == pytest.approx(sum(values["ce", c] for c in caps), rel=1e-9)
    assert seen["norms"] == steps[0].norms


def test_eq17_coefficients_use_pi_and_weights(data, tmp_path):
    trainer = Trainer(_config(data, tmp_path, "gradients.method=none", "reweight.enabled=false"))
    terms = [
        TermValue(n, c, torch.tensor(1.0))
        for c in ("perception", "planning")
        for n in ("ce", "perception", "reasoning", "planning")
    ]
    weights = {"ce": 2.0, "perception": 3.0, "reasoning": 5.0, "planning": 7.0}
    coefficients, _ = trainer.coefficients(terms, trainer.plan_rows(terms, weights), None, weights)
    pi = trainer.config.distill.pi
    caps = ["perception", "reasoning", "planning"]
    expected = [
        weights["ce"]
        if t.name == "ce"
        else pi[caps.index(t.capability)][caps.index(t.name)] * weights[t.name]
        for t in terms
    ]
    assert coefficients.tolist() == pytest.approx(expected)


@pytest.mark.parametrize(("grouping", "rows"), [("teacher", 4), ("capability", 2)])
def test_the_gramian_backpropagates_one_row_per_basis_vector_of_a_capability(data, tmp_path, grouping, rows):
    """The engine splits the projection rows by capability: the capability grouping's six rows (sup, distill per
    capability) need two backpropagated rows, the teacher grouping's anchor and three followers four (their
    exactness against explicit vectors: tests/test_training_methods.py)."""
    sampler = "per_capability" if grouping == "capability" else "mixed"
    config = _config(
        data,
        tmp_path,
        "optim.grad_accum=1",
        "reweight.enabled=false",
        f"gradients.grouping={grouping}",
        f"data.sampler={sampler}",
    )
    trainer = Trainer(config)
    trainer.accumulate(trainer.next_window())
    assert trainer.engine.backpropagated_rows == rows


def test_amortised_refresh_reuses_the_last_projection(data, tmp_path):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=2",
        "optim.grad_accum=1",
        "gradients.refresh_every=2",
        "reweight.enabled=false",
    )
    log = Trainer(config).train().log
    assert log[0]["proj/stage2_checked"] > 0  # refresh step: Gramian and projection
    assert "proj/stage2_checked" not in log[1]  # reuse step: no Gramian, last coefficients applied


def test_reweighting_updates_weights_and_logs_everything(data, tmp_path):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=2",
        "optim.grad_accum=1",
        "run.report_to=[tensorboard]",
        "distill.recipe=planning",
        "reweight.lr=0.05",
    )
    result = Trainer(config).train()
    first, last = result.log[0], result.log[-1]
    assert first["weight/ce"] == 1.0 and last["weight/ce"] != 1.0 and last["weight/planning"] != 1.0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for key in (
        "loss/ce/planning",
        "loss/planning/planning",
        "weight/planning",
        "grad_norm",
        "lr",
        "reweight/objective",
        "reweight/wG/ce",
        "gramian/rows",
    ):
        assert key in lines[-1], key
    assert lines[-1]["gramian/rows"] == 2  # CE and the planning term, split by capability (one here)
    assert any((tmp_path / "tensorboard").iterdir())


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(data, tmp_path, monkeypatch):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=3",
        "optim.grad_accum=1",
        "distill.recipe=sft",
        "run.max_nonfinite_streak=1",
    )
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.models.student.named_parameters()}
    real_terms = trainer.objective.values

    def poisoned(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        return [TermValue(t.name, t.capability, t.value * float("nan")) for t in terms]

    monkeypatch.setattr(trainer.objective, "values", poisoned)
    with pytest.raises(TrainingError, match="2 optimizer steps in a row had non-finite"):
        trainer.train()
    assert trainer.skipped == 2
    for name, param in trainer.models.student.named_parameters():
        assert torch.equal(param, before[name]), name  # skipped steps never touch the weights


def _train_cli(data: Path, out: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "drivekd.cli",
        "train",
        f"data.train={data}",
        f"run.output_dir={out}",
        "optim.max_steps=3",
        "optim.grad_accum=1",
        "run.save_every=1",
        "run.keep_checkpoints=10",
        "run.report_to=[]",
        "distill.recipe=multi",
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_weights(data, tmp_path):
    straight = _train_cli(data, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()[-3000:]
    killed = _train_cli(data, tmp_path / "killed")
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoint-1").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "checkpoint-3").exists()
    resumed = _train_cli(data, tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()[-3000:]
    a = load_file(tmp_path / "straight" / "checkpoint-3" / "student" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-3" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]


def test_lora_student_trains_adapters_only(data, tmp_path):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=1",
        "optim.grad_accum=1",
        "distill.recipe=perception",
        "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
        "run.save_every=1",
    )
    trainer = Trainer(config)
    frozen = {
        n: p.detach().clone() for n, p in trainer.models.student.named_parameters() if not p.requires_grad
    }
    trainable = [n for n, p in trainer.models.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = trainer.train()
    for name, param in trainer.models.student.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert (result.checkpoint / "student" / "adapter_model.safetensors").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_processes(args: list[str], world: int) -> None:
    """Run ``drivekd train`` as ``world`` gloo processes (or one plain process) and wait for them."""
    command = [sys.executable, "-m", "drivekd.cli", "train", *args]
    if world == 1:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return
    port = str(_free_port())
    workers = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        workers.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for worker in workers:
        assert worker.wait(timeout=900) == 0, worker.stdout.read()[-3000:]


# AGP and reweighting on, with updates large enough that a per-rank Gramian or update would show.
DISTRIBUTED = [
    "optim.grad_accum=1",
    "run.save_every=1",
    "run.keep_checkpoints=5",
    "run.report_to=[]",
    "distill.recipe=multi",
    "reweight.lr=0.05",
    "optim.lr=5e-3",
    "optim.warmup_ratio=0",
]


def _logs(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _assert_same_global_step(one: list[dict], two: list[dict]) -> None:
    assert [r["world"] for r in one] == [1] * len(one) and [r["world"] for r in two] == [2] * len(two)
    for a, b in zip(one, two, strict=True):
        assert a["proj/stage1_fired"] == b["proj/stage1_fired"]
        assert a["weight/planning"] == pytest.approx(b["weight/planning"], rel=1e-6)
    assert one[-1]["weight/planning"] != 1.0  # the reweighting was really on


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    """AGP and reweighting on: the Gramian, the projection and the update are global, not per rank."""
    # The per-capability step (a near-zero conflict flips stage-1 decisions between the mixed runs' round-offs).
    common = [
        f"data.train={data}",
        "optim.max_steps=2",
        *DISTRIBUTED,
        "gradients.grouping=capability",
        "data.sampler=per_capability",
    ]
    _train_processes([*common, f"run.output_dir={tmp_path / 'one'}", "data.micro_batch=2"], world=1)
    _train_processes([*common, f"run.output_dir={tmp_path / 'two'}", "data.micro_batch=1"], world=2)

    def weights(run: str, step: int) -> torch.Tensor:
        state = load_file(tmp_path / run / f"checkpoint-{step}" / "student" / "model.safetensors")
        return torch.cat([state[k].flatten() for k in sorted(state)])

    start = build_tiny_pair("qwen2_5_vl", seed=42).student  # the run's seed builds the same initial student
    initial = torch.cat(
        [v.flatten() for _, v in sorted(load_file_from_model(start, tmp_path / "initial").items())]
    )
    previous_one = previous_two = initial
    for step in (1, 2):
        one, two = weights("one", step), weights("two", step)
        update_one, update_two = one - previous_one, two - previous_two
        assert update_one.norm() > 1e-3 * initial.norm()  # large enough that a per-rank update would show
        assert float((update_two - update_one).norm() / update_one.norm()) < 1e-4
        previous_one, previous_two = one, two
    _assert_same_global_step(_logs(tmp_path / "one"), _logs(tmp_path / "two"))


def test_fsdp_outside_a_process_group_is_a_clear_error(data, tmp_path):
    with pytest.raises(DriveKDError, match="torchrun"):
        Trainer(_config(data, tmp_path, "run.fsdp=true", "distill.recipe=sft"))


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_resume(data, tmp_path):
    """FSDP2-sharded student, AGP and reweighting on: the sharded Gramian is global, the gathered checkpoint
    loads with transformers, and resuming a sharded run (weights + optimizer state) continues it exactly."""
    from transformers import AutoModelForImageTextToText

    common = [
        f"data.train={data}",
        *DISTRIBUTED,
        "optim.min_lr_ratio=1",
    ]  # constant lr: 2 + 1 steps = 3 steps
    _train_processes(
        [*common, "optim.max_steps=3", f"run.output_dir={tmp_path / 'one'}", "data.micro_batch=2"], 1
    )
    sharded = [*common, f"run.output_dir={tmp_path / 'fsdp'}", "data.micro_batch=1", "run.fsdp=true"]
    _train_processes([*sharded, "optim.max_steps=3"], world=2)
    import shutil

    shutil.rmtree(tmp_path / "fsdp" / "checkpoint-3")
    _train_processes([*sharded, "optim.max_steps=3"], world=2)  # resumes from checkpoint-2

    def weights(run: str, step: int) -> torch.Tensor:
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / run / f"checkpoint-{step}" / "student")
        return torch.cat([v.flatten() for _, v in sorted(model.state_dict().items())])

    previous = weights("one", 1)
    assert float((weights("fsdp", 1) - previous).norm() / previous.norm()) < 1e-5
    for step in (2, 3):
        one, two = weights("one", step), weights("fsdp", step)
        update_one, update_two = one - previous, two - weights("fsdp", step - 1)
        assert update_one.norm() > 1e-3 * one.norm()
        assert float((update_two - update_one).norm() / update_one.norm()) < 1e-4
        previous = one
    assert [r["step"] for r in _logs(tmp_path / "fsdp")] == [1, 2, 3]  # the second launch redid step 3 only
    _assert_same_global_step(_logs(tmp_path / "one"), _logs(tmp_path / "fsdp"))


def load_file_from_model(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The model's weights as ``save_pretrained`` writes them (same key names as the checkpoints)."""
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize(
    "name",
    [
        "internvl3-8b-to-1b",
        "internvl3-8b-to-1b-reference",
        "qwen2.5-vl-7b-to-3b",
        "qwen2.5-vl-7b-to-3b-reference",
    ],
)
def test_shipped_configs_load_with_the_paper_hyperparameters(name):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert (config.optim.lr, config.optim.grad_accum, config.optim.epochs, config.run.seed) == (
        5e-5,
        4,
        3,
        42,
    )
    assert (config.optim.warmup_ratio, config.optim.min_lr_ratio, config.data.micro_batch) == (0.03, 0.01, 1)
    assert config.gradients.method == "agp" and config.distill.recipe == "multi"
    # Both readings train the way the released code groups gradients, on the paper's batch, in working precision.
    assert (config.gradients.grouping, config.data.sampler) == ("teacher", "mixed")
    assert (config.model.dtype, config.optim.mixed_precision) == ("float32", "bf16")
    reference = name.endswith("-reference")
    mode = "reference" if reference else "paper"
    assert (config.reweight.mode, config.distill.normalisation) == (mode, mode)
    assert config.reweight.alpha == (0.0 if reference else 1.5)
    assert config.reweight.bounds == ((1e-6, 1e6) if reference else (0.05, 20.0))
    assert config.run.fsdp == name.startswith("qwen")  # a 3.75B fp32 student with AdamW needs two GPUs


@pytest.mark.parametrize("normalisation", ["paper", "reference"])
def test_training_from_the_cache_matches_the_live_teacher_without_a_teacher_in_memory(
    data, tmp_path, normalisation
):
    from drivekd.signals.cache import write_cache
    from drivekd.training.models import build_models

    plain = (
        "optim.max_steps=2",
        "optim.grad_accum=1",
        "gradients.method=none",
        "reweight.enabled=false",
        f"distill.normalisation={normalisation}",
    )
    live_config = _config(data, tmp_path / "live", *plain)
    live = Trainer(live_config)
    teacher = live.models.sources["perception"]
    collate = VLMCollator(
        live.models.processor, live.family.image_token_id(live.models.student), image_root=data.parent
    )
    write_cache(
        teacher,
        list(read_jsonl(data)),
        collate,
        tmp_path / "cache",
        needs=live.objective.needs,
        batch_size=2,
        teacher_name="tiny",
        dtype=torch.float32,
        tv_rows=live.config.distill.tv_rows,
    )
    other = "paper" if normalisation == "reference" else "reference"
    with pytest.raises(ValueError, match="rewrite the cache with drivekd cache-teacher --tv-rows"):
        build_models(
            _config(
                data,
                tmp_path / "x",
                *plain,
                f"distill.normalisation={other}",
                f"model.cache={tmp_path / 'cache'}",
            )
        )
    cached_config = _config(data, tmp_path / "cached", *plain, f"model.cache={tmp_path / 'cache'}")
    models = build_models(cached_config)
    assert models.teacher_models == []  # nothing but signals read from disk
    cached = Trainer(cached_config, models=models)
    live_log, cached_log = live.train().log, cached.train().log
    for a, b in zip(live_log, cached_log, strict=True):
        for key in a:
            if key.startswith("loss/"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key


def test_resume_drops_log_lines_after_the_checkpoint_and_a_torn_line(data, tmp_path):
    first = _config(
        data,
        tmp_path,
        "optim.max_steps=2",
        "optim.grad_accum=1",
        "distill.recipe=sft",
        "run.save_every=1",
        "run.resume=true",
    )
    Trainer(first).train()
    with (tmp_path / "log.jsonl").open("a") as handle:
        handle.write(
            '{"step": 3, "loss": 1.0}\n{"step": 4, "lo'
        )  # a step after the checkpoint, then a torn line
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-1x")  # resume from step 1 instead
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-1x")
    again = _config(
        data,
        tmp_path,
        "optim.max_steps=2",  # the same config: a changed one is another run, refused
        "optim.grad_accum=1",
        "distill.recipe=sft",
        "run.save_every=1",
        "run.resume=true",
    )
    Trainer(again).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_loss_scale_halves_on_overflow_and_grows_after_good_steps():
    from drivekd.training.scaling import LossScale

    scale = LossScale(True, initial=8.0, growth_interval=2)
    assert scale.update(False) and scale.scale == 4.0  # an overflow, not a counted failure
    assert not scale.update(True) and scale.scale == 4.0
    assert not scale.update(True) and scale.scale == 8.0  # grows after two good steps
    for _ in range(5):
        scale.update(False)
    assert scale.scale == 1.0 and not scale.update(False)  # at the floor a non-finite step is a real failure
    off = LossScale(False)
    assert off.scale == 1.0 and not off.update(False) and off.scale == 1.0


def test_fp16_training_scales_losses_and_overflows_do_not_stop_the_run(data, tmp_path, monkeypatch):
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=3",
        "optim.grad_accum=1",
        "optim.mixed_precision=fp16",
        "distill.recipe=planning",
        "run.max_nonfinite_streak=0",
    )
    trainer = Trainer(config)
    real_terms = trainer.objective.values
    calls = {"n": 0}

    def overflow_once(*args, **kwargs):
        terms = real_terms(*args, **kwargs)
        calls["n"] += 1
        return (
            [TermValue(t.name, t.capability, t.value * float("inf")) for t in terms]
            if calls["n"] == 1
            else terms
        )

    monkeypatch.setattr(trainer.objective, "values", overflow_once)
    log = trainer.train().log  # a streak limit of 0 would stop at once if the overflow counted
    assert log[0]["skipped_nonfinite"] == 1 and log[0]["loss_scale"] == 2.0**16
    assert log[1]["loss_scale"] == 2.0**15 and "skipped_nonfinite" not in log[1]
    assert all(math.isfinite(r["grad_norm"]) for r in log[1:])


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_terms_streamed_during_the_forward_equal_terms_built_after_it(data, tmp_path, metric):
    """Every attention term built layer by layer (LayerStream) equals the one built from the collected maps."""
    from drivekd.capture.recorder import AttentionRecorder
    from drivekd.training.terms import logit_positions

    config = _config(
        data, tmp_path, "model.dtype=float64", f"distill.metric={metric}", "data.sampler=per_capability"
    )
    trainer = Trainer(config)
    batch = trainer.next_window()[0]
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    index = trainer.index_of(batch)
    teacher = trainer.teacher_signals(batch, index)
    window = trainer.window_counts([batch])
    positions = logit_positions(batch.labels)

    def terms(streaming: bool) -> dict:
        streamed = trainer.objective.stream(batch, index, teacher) if streaming else None
        with AttentionRecorder(trainer.models.student, trainer.objective.plan, grad=True) as recorder:
            recorder.start(index, consumer=streamed)
            out = trainer.models.student(**batch.inputs, logits_to_keep=positions)
            captured = recorder.collect()
        built = trainer.objective.values(
            batch,
            index,
            out.logits,
            teacher,
            window,
            captured=captured,
            streamed=streamed,
            logit_positions=positions,
        )
        if streaming:  # the attention terms really came from the stream
            assert {(t.name, t.capability) for t in built if t.name != "ce"} == streamed.per_layer.keys()
        return {(t.name, t.capability): t.value for t in built}

    streamed, collected = terms(True), terms(False)
    assert streamed.keys() == collected.keys() and len(streamed) == 12
    for key, value in collected.items():
        torch.testing.assert_close(streamed[key], value, rtol=1e-12, atol=1e-15, msg=str(key))


def test_gradient_checkpointing_falls_back_to_the_unsplit_gramian_with_the_same_update(data, tmp_path):
    """Checkpointed layers replay in backward, so module hooks and map streaming are off: the Gramian backpropagates
    all six projection rows from collected maps, and the AGP update is the one of the split, streamed step."""

    def update(checkpointing: bool) -> tuple[torch.Tensor, int]:
        config = _config(
            data,
            tmp_path / str(checkpointing),
            "model.dtype=float64",
            "optim.grad_accum=1",
            "reweight.enabled=false",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            "gradients.grouping=capability",
            "data.sampler=per_capability",
        )
        trainer = Trainer(config)
        batch = trainer.next_window()[0]
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
        trainer.accumulate([batch], dict.fromkeys(trainer.recipe.names, 1.0))
        params = [p for p in trainer.models.student.parameters() if p.requires_grad]
        return torch.cat([p.grad.flatten() for p in params]), trainer.engine.backpropagated_rows

    split, split_rows = update(checkpointing=False)
    checkpointed, checkpointed_rows = update(checkpointing=True)
    assert (split_rows, checkpointed_rows) == (2, 6)
    # RMSNorm's float32 round-off depends on the backpropagated rows (see the explicit AGP test above).
    assert float((checkpointed - split).norm() / split.norm()) < 1e-6
