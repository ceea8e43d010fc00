"""Precision that trains: checkpoint replays inside the Gramian's vmapped backward equal the forward (autocast
included)."""

from __future__ import annotations

import copy
import functools
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
from drivekd.gradients.autogram import GramianEngine, functional_forward
from drivekd.gradients.replay import replay_outside_vmap
from drivekd.losses import full_attention_mse, supervised_loss, text_to_vision_mse_blocks
from drivekd.models.pair import build_tiny_pair
from drivekd.training.config import load_config

QUIET = ["run.tensorboard=false", "run.resume=false", "run.save_every=1000"]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
            out = functional_forward(model, tapped, batch.inputs)
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
