"""The Gramian engine gives the exact Gramian of per-loss gradients, tied weights included, without K copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.gradients.autogram import GramianEngine, functional_forward
from drivekd.losses import full_attention_mse, supervised_loss, text_to_vision_mse_blocks
from drivekd.models.pair import build_tiny_pair


def _explicit_jacobian(losses, params):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


class _TinyLM(nn.Module):
    """Embedding -> MLP -> LM head, optionally tied: the smallest model with every code path of the engine."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 6))
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_gramian_equals_explicit_jacobian_product_on_a_tiny_lm(tied, scale):
    torch.manual_seed(0)
    model = _TinyLM(tied).double()
    ids = torch.randint(0, 11, (3, 5))
    engine = GramianEngine(model)

    def losses_of(logits):
        return [
            scale * logits.logsumexp(-1).mean(),
            (logits[:, -1] ** 2).sum(),
            -scale * logits[0, :, 3].sum(),
            logits.sum() * 0,  # a loss with a zero gradient
        ]

    with engine.tap() as tapped:
        losses = losses_of(functional_forward(model, tapped, {"ids": ids}))
        gramian = engine.gramian(losses, tapped)
    params = list(model.parameters())
    jac = _explicit_jacobian(losses_of(model(ids)), params)
    torch.testing.assert_close(
        gramian, jac @ jac.T, rtol=1e-12, atol=1e-12 * float((jac @ jac.T).abs().max())
    )
    # The graph is kept and the taps pass gradients through: one backward of sum c_k L_k gives c^T J.
    coefficients = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    torch.autograd.backward(sum(c * loss for c, loss in zip(coefficients, losses, strict=True)))
    update = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(update, coefficients @ jac, rtol=1e-12, atol=1e-14)


def test_cotangent_rows_give_gramians_of_combinations():
    torch.manual_seed(1)
    model = _TinyLM(tied=True).double()
    ids = torch.randint(0, 11, (2, 4))
    engine = GramianEngine(model)
    rows = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 0.5]], dtype=torch.float64)
    with engine.tap() as tapped:
        logits = functional_forward(model, tapped, {"ids": ids})
        losses = [logits.mean(), logits.pow(2).mean(), logits[:, 0].sum()]
        gramian = engine.gramian(losses, tapped, rows)
    jac = _explicit_jacobian(
        [model(ids).mean(), model(ids).pow(2).mean(), model(ids)[:, 0].sum()], list(model.parameters())
    )
    torch.testing.assert_close(gramian, rows @ jac @ jac.T @ rows.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "qwen3_vl"])
@pytest.mark.parametrize("tied", [False, True])
def test_gramian_of_drivekd_losses_on_a_tiny_vlm(family, tied, image_dir, samples):
    pair = build_tiny_pair(family)
    model = pair.student.double().train()
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    use_capture_attention(model)
    batch = VLMCollator(pair.student_processor, pair.family.image_token_id(model), image_root=image_dir)(
        samples
    )
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)
    plan = CapturePlan.of(tv=[0], full=[1, 2])

    def losses_of(forward):
        with AttentionRecorder(model, plan, grad=True) as recorder:
            recorder.start(index)
            out = forward()
            captured = recorder.collect()
        return [
            supervised_loss(out.logits, batch.labels),
            text_to_vision_mse_blocks(captured.tv[0], 0.5 * captured.tv[0].detach(), index),
            full_attention_mse(captured.full[1], captured.full[2].detach(), batch.roles.valid),
            supervised_loss(out.logits[:1], batch.labels[:1]),
        ]

    engine = GramianEngine(model)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel is not float64-exact in backward
        with engine.tap() as tapped:
            losses = losses_of(lambda: functional_forward(model, tapped, batch.inputs))
            gramian = engine.gramian(losses, tapped)
        jac = _explicit_jacobian(losses_of(lambda: model(**batch.inputs)), [p for p in model.parameters()])
    expected = jac @ jac.T
    torch.testing.assert_close(gramian, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
