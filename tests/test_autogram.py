"""The Gramian engine gives the exact Gramian of per-loss gradients, tied weights included, without K copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.gradients import modules
from drivekd.gradients.autogram import GramianEngine
from drivekd.gradients.owners import owners_of
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
        losses = losses_of(model(ids=ids))
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


class _Stack(nn.Sequential):
    """Layers without vocabulary modules: every Gram entry comes from a parameter tap."""

    def get_input_embeddings(self) -> None:
        return None

    def get_output_embeddings(self) -> None:
        return None


def test_a_parameter_tap_consumes_as_soon_as_its_gradient_is_complete():
    """Parameter taps are made at first use, so the backward consumes (and frees) each layer's K gradient rows
    before it moves on to the layers below; taps made before the forward ran after every other node and held
    every parameter's rows at once."""
    torch.manual_seed(0)
    layers = _Stack(*[nn.Linear(5, 5) for _ in range(4)]).double()
    engine = GramianEngine(layers)
    events: list[str] = []
    add_rows = engine.state.add_rows
    engine.state.add_rows = lambda flat: (events.append("param"), add_rows(flat))[1]
    x = torch.randn(3, 5, dtype=torch.float64)
    with engine.tap() as tapped:
        h = x
        for layer in layers:
            h = layer(h)
            h.register_hook(lambda grad: events.append("activation"))
        engine.gramian([h.sum(), h.pow(2).sum()], tapped)
    # Each layer's output gradient, then its weight's and bias's rows, before the layer below (functional_call with
    # taps made before the forward consumed all eight after the last activation gradient).
    assert events == ["activation", "param", "param"] * 4


def test_cotangent_rows_give_gramians_of_combinations():
    torch.manual_seed(1)
    model = _TinyLM(tied=True).double()
    ids = torch.randint(0, 11, (2, 4))
    engine = GramianEngine(model)
    rows = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 0.5]], dtype=torch.float64)
    with engine.tap() as tapped:
        logits = model(ids=ids)
        losses = [logits.mean(), logits.pow(2).mean(), logits[:, 0].sum()]
        gramian = engine.gramian(losses, tapped, rows)
    jac = _explicit_jacobian(
        [model(ids).mean(), model(ids).pow(2).mean(), model(ids)[:, 0].sum()], list(model.parameters())
    )
    torch.testing.assert_close(gramian, rows @ jac @ jac.T @ rows.T, rtol=1e-12, atol=1e-14)


def _tiny_vlm(family, image_dir, samples):
    """A float64 tiny student, its batch of two rows (one and two images) and a recorded-forward helper."""
    pair = build_tiny_pair(family)
    model = pair.student.double().train()
    use_capture_attention(model)
    batch = VLMCollator(pair.student_processor, pair.family.image_token_id(model), image_root=image_dir)(
        samples
    )
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)

    def recorded(forward):
        with AttentionRecorder(model, CapturePlan.of(tv=[0], full=[1, 2]), grad=True) as recorder:
            recorder.start(index)
            out = forward()
            return out, recorder.collect()

    return pair, model, batch, index, recorded


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "qwen3_vl"])
@pytest.mark.parametrize("tied", [False, True])
def test_gramian_of_drivekd_losses_on_a_tiny_vlm(family, tied, image_dir, samples):
    _, model, batch, index, recorded = _tiny_vlm(family, image_dir, samples)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight

    def losses_of(forward):
        out, captured = recorded(forward)
        return [
            supervised_loss(out.logits, batch.labels),
            text_to_vision_mse_blocks(captured.tv[0], 0.5 * captured.tv[0].detach(), index),
            full_attention_mse(captured.full[1], captured.full[2].detach(), batch.roles.valid),
            supervised_loss(out.logits[:1], batch.labels[:1]),
        ]

    engine = GramianEngine(model)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel is not float64-exact in backward
        with engine.tap() as tapped:
            losses = losses_of(lambda: model(**batch.inputs))
            gramian = engine.gramian(losses, tapped)
        jac = _explicit_jacobian(losses_of(lambda: model(**batch.inputs)), [p for p in model.parameters()])
    expected = jac @ jac.T
    torch.testing.assert_close(gramian, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


# ---- module taps split by owner group ----------------------------------------------------------------------------
def _row_losses(logits, groups_of_rows):
    """Losses that each read the rows of one group only, and that group per loss."""
    losses, loss_groups = [], []
    for g in sorted(set(groups_of_rows)):
        rows = [b for b, owner in enumerate(groups_of_rows) if owner == g]
        part = logits[rows]
        losses += [part.logsumexp(-1).mean(), (part[:, -1] ** 2).sum(), -part[..., 3].sum()]
        loss_groups += [g] * 3
    return losses, loss_groups


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("groups_of_rows", [[0, 1, 2], [1, 0, 1], [0, 0, 0]])
@pytest.mark.parametrize("block", [None, 1])
def test_split_gramian_equals_explicit_gramian_of_any_rows(tied, groups_of_rows, block, monkeypatch):
    """``block``: values per column block of a linear module's rows; 1 makes every output feature a block."""
    if block is not None:
        monkeypatch.setattr(modules, "_BLOCK_ELEMENTS", block)
    torch.manual_seed(2)
    model = _TinyLM(tied).double()
    ids = torch.randint(0, 11, (3, 5))
    groups = max(groups_of_rows) + 1
    owners = owners_of(groups_of_rows, torch.zeros(3), groups)
    engine = GramianEngine(model)
    assert engine.module_taps
    with engine.tap(owners) as tapped:
        losses, loss_groups = _row_losses(model(ids=ids), groups_of_rows)
        rows = torch.randn(7, len(losses), dtype=torch.float64)  # dense: rows mix every group
        gramian = engine.gramian(losses, tapped, rows, loss_groups)
        assert tapped.splittable
    assert engine.backpropagated_rows == 3  # a basis of each group's three losses, not the 7 rows
    params = list(model.parameters())
    jac = _explicit_jacobian(_row_losses(model(ids), groups_of_rows)[0], params)
    expected = rows @ jac @ jac.T @ rows.T
    torch.testing.assert_close(gramian, expected, rtol=1e-11, atol=1e-11 * float(expected.abs().max()))
    # Module taps pass gradients through: one backward of sum c_k L_k gives c^T J.
    coefficients = torch.randn(len(losses), dtype=torch.float64)
    torch.autograd.backward(sum(c * loss for c, loss in zip(coefficients, losses, strict=True)))
    torch.testing.assert_close(
        torch.cat([p.grad.flatten() for p in params]), coefficients @ jac, rtol=1e-12, atol=1e-13
    )


def test_a_module_with_active_dropout_keeps_parameter_taps():
    model = _TinyLM(tied=False)
    model.body.insert(1, nn.Dropout(0.1))
    model.body = nn.Sequential(model.body)  # the dropout now sits below a module that owns no parameter...
    engine = GramianEngine(model)
    assert engine.module_taps  # ...so every parameter owner is still deterministic
    stochastic = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.1))
    stochastic.scale = nn.Parameter(torch.ones(6))  # owns a parameter and has dropout below it
    model.body = nn.Sequential(stochastic, nn.Linear(6, 6))
    assert not GramianEngine(model).module_taps
    model.eval()
    assert GramianEngine(model).module_taps


def _float64_norms(model: nn.Module) -> None:
    """RMSNorm layers compute in float32 even in a float64 model; that round-off depends on the cotangent, so a
    Gramian from combined rows would differ from the per-loss reference by ~1e-8. Make them float64 throughout."""

    def forward(self, hidden_states):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        return self.weight * hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + eps)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "qwen3_vl"])
def test_split_gramian_of_drivekd_losses_on_a_tiny_vlm(family, image_dir, samples):
    """Rows of different groups, images of different counts: the split Gramian equals the explicit one."""
    pair, model, batch, index, recorded = _tiny_vlm(family, image_dir, samples)
    _float64_norms(model)

    def losses_of(forward):
        out, captured = recorded(forward)
        losses = []
        for row in (0, 1):
            rows = torch.tensor([row])
            picked = index.select(rows)
            losses += [
                supervised_loss(out.logits[rows], batch.labels[rows]),
                text_to_vision_mse_blocks(captured.tv[0][rows], 0.5 * captured.tv[0][rows].detach(), picked),
                full_attention_mse(
                    captured.full[1][rows], captured.full[2][rows].detach(), batch.roles.valid[rows]
                ),
            ]
        return losses

    engine = GramianEngine(model, is_vision=pair.family.is_vision_module)
    owners = owners_of([0, 1], batch.roles.vision.sum(1), 2)
    rows = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):
        with engine.tap(owners) as tapped:
            losses = losses_of(lambda: model(**batch.inputs))
            gramian = engine.gramian(losses, tapped, rows, [0, 0, 0, 1, 1, 1])
            splittable = tapped.splittable
        jac = _explicit_jacobian(losses_of(lambda: model(**batch.inputs)), list(model.parameters()))
    expected = rows @ jac @ jac.T @ rows.T
    torch.testing.assert_close(gramian, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    # Qwen3-VL's vision position embedding reads (4, patches) interpolation indices: no row axis, no split.
    assert splittable == (family != "qwen3_vl")
    assert engine.backpropagated_rows == (3 if splittable else 5)
