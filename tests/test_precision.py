"""Precision that trains: checkpoint replays inside the Gramian's vmapped backward equal the forward (autocast
included), low-precision AdamW is refused, fp32 weights under bf16 autocast update like fp32, and checkpoints keep the
save dtype while resume keeps the fp32 state exactly."""

from __future__ import annotations

import copy
import functools
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.data.synthetic import generate_split
from drivekd.gradients.autogram import GramianEngine
from drivekd.gradients.replay import replay_outside_vmap
from drivekd.losses import full_attention_mse, supervised_loss, text_to_vision_mse_blocks
from drivekd.models.pair import build_tiny_pair
from drivekd.training.checkpoint import MASTER_FILE, master_weights, write_manifest
from drivekd.training.config import ConfigError, load_config
from drivekd.training.models import build_models
from drivekd.training.precision import LowPrecisionWeightsError
from drivekd.training.trainer import Trainer

QUIET = ["run.report_to=[]", "run.resume=false", "run.save_every=1000"]
MIXED = ["optim.mixed_precision=bf16", "model.gradient_checkpointing=true"]  # the paper presets' precision


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("train"), n_scenes=3, seed=0, views="single").path


def _config(data: Path, out: Path, *overrides: str):
    return load_config(overrides=[f"data.train={data}", f"run.output_dir={out}", *QUIET, *overrides])


# ---- checkpoint replays run outside vmap -------------------------------------------------------------------------
class _Checkpointed(nn.Module):
    """A layer checkpointed the way transformers does it, recording whether each run of its body is under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self.under_vmap: list[bool] = []

    def body(self, x: torch.Tensor) -> torch.Tensor:
        self.under_vmap.append(torch._C._functorch.peek_interpreter_stack() is not None)
        return torch.tanh(self.linear(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gradient_checkpointing_func(self.body, x)


@pytest.mark.parametrize("patched", [False, True])
def test_a_replay_in_a_vmapped_backward_runs_outside_vmap_only_when_patched(patched):
    layer = _Checkpointed()
    original = layer._gradient_checkpointing_func
    x = torch.randn(3, 4)
    with replay_outside_vmap(layer) if patched else nullcontext():
        out = layer(x)
    assert layer._gradient_checkpointing_func is original  # the patch lasts for the forward only
    losses = torch.stack([out.sum(), out.pow(2).sum()])
    torch.func.vmap(lambda v: torch.autograd.grad(losses, layer.linear.weight, v, retain_graph=True))(
        torch.eye(2)
    )
    # forward, then the replay inside the vmapped backward
    assert layer.under_vmap == [False, not patched]


def _student(family: str, dtype: torch.dtype, samples, image_dir):
    pair = build_tiny_pair(family)
    model = pair.student.to(dtype).train()
    use_capture_attention(model)
    batch = VLMCollator(pair.student_processor, pair.family.image_token_id(model), image_root=image_dir)(
        samples
    )
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(dtype)
    return model, batch


def _gramian_and_update(model, batch, autocast: torch.dtype | None):
    """The engine's Gramian of four DriveKD losses (parameter taps) and the update of one backward of sum c_k L_k,
    with c_k a function of the Gramian (its row sums over the trace): the update depends on every entry."""
    index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)
    engine = GramianEngine(model)
    torch.manual_seed(0)
    with (
        engine.tap() as tapped,
        AttentionRecorder(model, CapturePlan.of(tv=[0], full=[1, 2]), grad=True) as recorder,
    ):
        recorder.start(index)
        with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(**batch.inputs)
        captured = recorder.collect()
        losses = [
            supervised_loss(out.logits, batch.labels),
            text_to_vision_mse_blocks(captured.tv[0], 0.5 * captured.tv[0].detach(), index),
            full_attention_mse(captured.full[1], captured.full[2].detach(), batch.roles.valid),
            supervised_loss(out.logits[:1], batch.labels[:1]),
        ]
        gramian = engine.gramian(losses, tapped)
    coefficients = (gramian.sum(1) / gramian.trace()).to(losses[0].dtype)
    model.zero_grad(set_to_none=True)
    torch.autograd.backward(sum(c * loss for c, loss in zip(coefficients, losses, strict=True)))
    update = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return gramian, update


@pytest.mark.parametrize(
    ("dtype", "autocast", "rel"),
    [
        (torch.float64, None, 1e-10),
        (torch.float32, None, 1e-5),
        (torch.float32, torch.bfloat16, 1e-5),
        (torch.float32, torch.float16, 1e-5),
    ],
    ids=["float64", "float32", "float32-bf16-autocast", "float32-fp16-autocast"],
)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_checkpointed_gramian_and_update_equal_the_plain_ones(
    family, dtype, autocast, rel, samples, image_dir
):
    plain, batch = _student(family, dtype, samples, image_dir)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    gramian, update = _gramian_and_update(plain, batch, autocast)
    replayed_gramian, replayed_update = _gramian_and_update(checkpointed, batch, autocast)
    assert float(update.norm()) > 0 and bool(torch.isfinite(gramian).all())
    torch.testing.assert_close(replayed_gramian, gramian, rtol=rel, atol=rel * float(gramian.abs().max()))
    assert float((replayed_update - update).norm() / update.norm()) < rel


# ---- every method trains under mixed precision with checkpointing ------------------------------------------------
@pytest.mark.parametrize(
    ("method", "precision"),
    [("none", "bf16"), ("g1", "bf16"), ("g2", "bf16"), ("agp", "bf16"), ("none", "fp16"), ("agp", "fp16")],
)
def test_mixed_precision_with_checkpointing_trains_every_method(
    method, precision, data, tmp_path, monkeypatch
):
    """Every method builds a Gramian (none: for the reweighting) through checkpointed layers under autocast."""
    built = []
    real = GramianEngine.gramian
    monkeypatch.setattr(
        GramianEngine, "gramian", lambda self, *a, **k: built.append(1) or real(self, *a, **k)
    )
    config = _config(
        data,
        tmp_path,
        "optim.max_steps=1",
        "optim.grad_accum=1",
        f"gradients.method={method}",
        f"optim.mixed_precision={precision}",
        "model.gradient_checkpointing=true",
    )
    trainer = Trainer(config)
    before = [p.detach().clone() for p in trainer.models.student.parameters()]
    log = trainer.train().log
    assert built and "skipped_nonfinite" not in log[0] and torch.isfinite(torch.tensor(log[0]["loss"]))
    after = list(trainer.models.student.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


# ---- pure low-precision AdamW is refused -------------------------------------------------------------------------
def test_low_precision_weights_are_refused_unless_allowed(data, tmp_path):
    why = re.escape("2^-7")
    with pytest.raises(
        ConfigError, match=rf"model.dtype=bfloat16 without model.lora.*{why}.*optim.mixed_precision=bf16"
    ):
        _config(data, tmp_path, "model.dtype=bfloat16")
    with pytest.raises(ConfigError, match=re.escape("model.dtype=float16")):
        _config(data, tmp_path, "model.dtype=float16", "optim.mixed_precision=fp16")
    assert _config(data, tmp_path, "model.dtype=bfloat16", "optim.allow_low_precision_weights=true")
    assert _config(
        data, tmp_path, "model.dtype=bfloat16", "model.lora.r=4"
    )  # adapters: checked in the trainer
    # The trainer checks the parameters it would train, whatever the config says (models handed in, LoRA adapters).
    config = _config(data, tmp_path, "distill.recipe=sft")
    models = build_models(config, device="cpu")
    models.student.to(torch.bfloat16)
    with pytest.raises(LowPrecisionWeightsError, match=rf"trainable parameters are bfloat16.*{why}"):
        Trainer(config, models=models)
    allowed = _config(data, tmp_path, "distill.recipe=sft", "optim.allow_low_precision_weights=true")
    Trainer(allowed, models=models)
    lora = _config(data, tmp_path, "distill.recipe=sft", "model.dtype=bfloat16", "model.lora.r=4")
    trainer = Trainer(lora)  # PEFT keeps the adapters in float32 over a bf16 base
    trainable = [p for p in trainer.models.student.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


# ---- the shipped precision trains like fp32 ----------------------------------------------------------------------
def _update_after(data: Path, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """w_30 - w_0 of every 2-D weight matrix, after 30 steps at the paper's lr 5e-5 (planning recipe: CE + t-v
    attention, with the reweighting's Gramian built through the checkpointed layers)."""
    config = _config(
        data,
        out,
        "optim.max_steps=30",
        "optim.grad_accum=1",
        "optim.lr=5e-5",
        "distill.recipe=planning",
        *overrides,
    )
    trainer = Trainer(config)
    start = {n: p.detach().float().clone() for n, p in trainer.models.student.named_parameters()}
    trainer.train()
    return {n: p.detach().float() - start[n] for n, p in trainer.models.student.named_parameters()}


def test_update_with_the_shipped_precision_matches_fp32_after_30_steps(data, tmp_path):
    reference = _update_after(data, tmp_path / "fp32")
    shipped = _update_after(data, tmp_path / "mixed", *MIXED)
    pure = _update_after(
        data, tmp_path / "bf16", "model.dtype=bfloat16", "optim.allow_low_precision_weights=true"
    )

    def cosines(update):
        return {
            n: float(torch.nn.functional.cosine_similarity(update[n].flatten(), r.flatten(), dim=0))
            for n, r in reference.items()
            if r.dim() == 2
        }

    shipped_cos = cosines(shipped)
    assert len(shipped_cos) > 10 and min(shipped_cos.values()) >= 0.99, min(
        shipped_cos.items(), key=lambda i: i[1]
    )
    # What the refusal is about: in bf16 weights the norm weights (1.0, spacing 2^-7) never move at lr 5e-5, and
    # the weight matrices' updates point elsewhere.
    norms = [n for n, r in reference.items() if "norm" in n and r.dim() == 1]
    assert norms and all(float(reference[n].abs().max()) > 0 and not pure[n].any() for n in norms)
    assert min(cosines(pure).values()) < 0.99


# ---- checkpoints in the save dtype, resume exact -----------------------------------------------------------------
def test_bf16_checkpoints_load_in_bf16_and_resume_restores_the_fp32_weights_exactly(data, tmp_path):
    from transformers import AutoModelForImageTextToText

    common = [
        "optim.max_steps=4",
        "optim.grad_accum=1",
        "distill.recipe=planning",
        "model.save_dtype=bfloat16",
    ]
    common += ["run.save_every=2", "run.keep_checkpoints=5"]
    straight = Trainer(_config(data, tmp_path / "straight", *common))
    straight.train()
    final = {n: t.clone() for n, t in straight.models.student.state_dict().items()}
    # The HF folder is bf16 and says so; the master file holds the exact fp32 weights.
    folder = tmp_path / "straight" / "checkpoint-4" / "student"
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16 and loaded.config.dtype == torch.bfloat16
    master = master_weights(folder.parent)
    assert master.keys() == final.keys() and all(torch.equal(master[n], final[n]) for n in final)
    saved = loaded.state_dict()
    assert all(torch.equal(saved[n], final[n].to(torch.bfloat16)) for n in final)

    def resumed(without_master: bool) -> dict[str, torch.Tensor]:
        out = tmp_path / f"resumed-{without_master}"
        shutil.copytree(tmp_path / "straight" / "checkpoint-2", out / "checkpoint-2")
        if without_master:
            (out / "checkpoint-2" / MASTER_FILE).unlink()
            # Re-sealed: a checkpoint whose files differ from its manifest is refused as incomplete.
            write_manifest(out / "checkpoint-2")
        trainer = Trainer(_config(data, out, *common, "run.resume=true"))
        assert trainer.train().steps == 4
        return trainer.models.student.state_dict()

    exact = resumed(without_master=False)
    assert all(torch.equal(exact[n], final[n]) for n in final)
    rounded = resumed(without_master=True)  # from the bf16 folder alone the fp32 state is lost
    assert any(not torch.equal(rounded[n], final[n]) for n in final)


def test_native_save_dtype_is_what_the_pretrained_config_declares(tmp_path):
    from drivekd.training.checkpoint import resolve_save_dtype

    pair = build_tiny_pair("qwen2_5_vl")
    pair.student.to(torch.bfloat16).save_pretrained(tmp_path / "bf16-student")
    assert resolve_save_dtype("native", str(tmp_path / "bf16-student"), "float32") == torch.bfloat16
    assert (
        resolve_save_dtype("native", "tiny", "float32") == torch.float32
    )  # no pretrained config: model.dtype
    assert resolve_save_dtype("float16", "tiny", "float32") == torch.float16


def test_lora_adapters_saved_in_bf16_resume_in_exact_fp32(data, tmp_path):
    common = ["distill.recipe=sft", "model.lora.r=4", "model.save_dtype=bfloat16", "optim.max_steps=1"]
    trained = Trainer(_config(data, tmp_path, *common, "run.save_every=1"))
    trained.train()
    adapters = {
        n: p.detach().clone() for n, p in trained.models.student.named_parameters() if p.requires_grad
    }
    assert all(p.dtype == torch.float32 for p in adapters.values())
    assert master_weights(tmp_path / "checkpoint-1").keys() == adapters.keys()
    resumed = Trainer(_config(data, tmp_path, *common, "run.resume=true"))
    assert resumed.train().steps == 1  # restored at step 1, nothing left to train
    restored = dict(resumed.models.student.named_parameters())
    assert all(torch.equal(restored[n], p) for n, p in adapters.items())
