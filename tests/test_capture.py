"""Attention capture equals eager attention, keeps gradients exact and behaves under checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from drivekd.capture.recorder import ATTENTION_NAME, AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.errors import CaptureError
from drivekd.models.families import FAMILIES
from drivekd.models.pair import build_tiny_pair

FAMILY_NAMES = sorted(FAMILIES)


def _setup(family: str, image_dir, samples, padding_side: str = "right", dtype=torch.float32):
    pair = build_tiny_pair(family)
    model = pair.teacher.to(dtype).train()  # 4 query heads over 2 key heads: grouped-query attention
    batch = VLMCollator(
        pair.teacher_processor,
        pair.family.image_token_id(model),
        image_root=image_dir,
        padding_side=padding_side,
    )(samples)
    if "pixel_values" in batch.inputs:
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(dtype)
    return pair, model, batch, TVIndex.from_masks(batch.roles.text, batch.roles.vision)


def _eager_head_means(model, batch):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    out = eager(**batch.inputs, output_attentions=True)
    return eager, out, [a.mean(dim=1) for a in out.attentions]


def _captured(model, plan, batch, index, grad=True):
    use_capture_attention(model)
    with AttentionRecorder(model, plan, grad=grad) as recorder:
        recorder.start(index)
        out = model(**batch.inputs)
        return out, recorder.collect()


def _attention_loss(full: dict, tv: dict, valid: torch.Tensor) -> torch.Tensor:
    """A loss that weights every map entry differently, so a wrong gradient anywhere shows."""
    rows = valid[:, :, None]
    total = sum(torch.where(rows, m, 0).pow(2).sum() * (k + 1) for k, m in full.items())
    return total + sum(b.pow(3).sum() * (k + 2) for k, b in tv.items())


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_maps_equal_eager_head_means(family, padding_side, image_dir, samples):
    _, model, batch, index = _setup(family, image_dir, samples, padding_side)
    layers = len(FAMILIES[family].decoder_layers(model))
    assert batch.roles.padding.any(), "the two samples must differ in length so that padding is exercised"
    _, eager_out, reference = _eager_head_means(model, batch)
    plan = CapturePlan.of(tv=[0, layers - 2], full=range(1, layers), chunk_size=16)
    out, captured = _captured(copy.deepcopy(model), plan, batch, index)
    valid = batch.roles.valid
    assert (out.logits - eager_out.logits)[valid].abs().max() < 1e-5
    for layer in range(1, layers):
        assert captured.full[layer].shape == reference[layer].shape
        assert (captured.full[layer] - reference[layer])[valid].abs().max() <= 1e-6
    for layer in (0, layers - 2):
        assert captured.tv[layer].shape[-1] == int(batch.roles.vision.sum(1).max())
        assert (captured.tv[layer] - index.gather(reference[layer])).abs().max() <= 1e-6


# How close the routes can be is bounded by transformers' eager attention, which takes its softmax in float32 even
# for float64 models, and by SDPA vs eager layer outputs (~1e-7 relative in gradients even for plain CE). Measured
# relative errors over the decoder gradient are 3e-7..7e-6 (float64) and ~1e-5 (float32). transformers' eager route
# gives NaN with left padding in float64, so left padding runs in float32.
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(
    ("padding_side", "dtype", "rtol"), [("right", torch.float64, 5e-5), ("left", torch.float32, 5e-4)]
)
def test_student_gradients_match_eager_route(family, padding_side, dtype, rtol, image_dir, samples):
    _, model, batch, index = _setup(family, image_dir, samples, padding_side, dtype=dtype)
    layers = len(FAMILIES[family].decoder_layers(model))
    full_layers, tv_layers = list(range(layers - 1)), [0, layers - 2]
    eager, _, reference = _eager_head_means(model, batch)
    valid = batch.roles.valid
    _attention_loss(
        {k: reference[k] for k in full_layers}, {k: index.gather(reference[k]) for k in tv_layers}, valid
    ).backward()
    student = copy.deepcopy(model)
    plan = CapturePlan.of(tv=tv_layers, full=full_layers, chunk_size=8)
    _, captured = _captured(student, plan, batch, index)
    _attention_loss(captured.full, captured.tv, valid).backward()
    eager_grads = dict(eager.named_parameters())
    ours, reference = [], []
    for name, param in student.named_parameters():
        assert param.grad is None or param.grad.isfinite().all(), name
        # The vision tower runs the same SDPA code on both routes and only inherits the decoder's differences
        # (transformers' eager route even gives NaN there for InternVL in float64; capture does not).
        if "vision" in name or "visual" in name or eager_grads[name].grad is None:
            continue
        ours.append(param.grad.flatten())
        reference.append(eager_grads[name].grad.flatten())
    ours_vec, reference_vec = torch.cat(ours), torch.cat(reference)
    assert reference_vec.norm() > 0
    # One relative error over the whole decoder gradient: per-tensor checks would be dominated by tensors whose
    # exact gradient is zero (a key bias shifts every score of a query equally, so softmax ignores it).
    assert (ours_vec - reference_vec).norm() / reference_vec.norm() <= rtol


def test_teacher_records_without_graph(image_dir, samples):
    _, model, batch, index = _setup("qwen2_5_vl", image_dir, samples)
    with torch.no_grad():
        _, captured = _captured(model, CapturePlan.of(tv=[0], full=[1]), batch, index, grad=False)
    assert not captured.tv[0].requires_grad and not captured.full[1].requires_grad


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_non_reentrant_checkpointing_records_once_and_keeps_gradients(family, image_dir, samples):
    _, model, batch, index = _setup(family, image_dir, samples, dtype=torch.float64)
    layers = len(FAMILIES[family].decoder_layers(model))
    plan = CapturePlan.of(tv=[0], full=range(1, layers - 1), chunk_size=8, fuse=True)

    def step(m):
        use_capture_attention(m)
        seen = []
        with AttentionRecorder(m, plan, grad=True) as recorder:
            observe = recorder.observe
            recorder.observe = lambda layer, *a, **kw: (seen.append(layer), observe(layer, *a, **kw))[1]
            recorder.start(index)
            out = m(**batch.inputs)
            captured = recorder.collect()
            (
                _attention_loss(captured.full, captured.tv, batch.roles.valid) + out.logits.sum() * 1e-3
            ).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, captured, seen

    plain_grads, plain, plain_seen = step(copy.deepcopy(model))
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt_grads, ckpt, ckpt_seen = step(checkpointed)
    assert sorted(ckpt.full) == sorted(plain.full) and sorted(ckpt.tv) == sorted(plain.tv)
    assert len(ckpt_seen) == 2 * len(plain_seen)  # every layer replayed once in backward, recorded once
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)


def test_reentrant_checkpointing_is_refused(image_dir, samples):
    _, model, _, _ = _setup("qwen2_5_vl", image_dir, samples)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    use_capture_attention(model)
    with pytest.raises(CaptureError, match="reentrant"):
        AttentionRecorder(model, CapturePlan.of(tv=[0]), grad=True).__enter__()


def test_student_capture_under_no_grad_is_refused(image_dir, samples):
    _, model, batch, index = _setup("qwen2_5_vl", image_dir, samples)
    with torch.no_grad(), pytest.raises(CaptureError, match="no_grad"):
        _captured(model, CapturePlan.of(full=[0]), batch, index, grad=True)


def test_chunking_does_not_change_maps(image_dir, samples):
    _, model, batch, index = _setup("internvl", image_dir, samples, "left")
    _, small = _captured(copy.deepcopy(model), CapturePlan.of(tv=[0], full=[2], chunk_size=5), batch, index)
    _, large = _captured(
        copy.deepcopy(model), CapturePlan.of(tv=[0], full=[2], chunk_size=4096), batch, index
    )
    torch.testing.assert_close(small.full[2], large.full[2], rtol=0, atol=1e-7)
    torch.testing.assert_close(small.tv[0], large.tv[0], rtol=0, atol=1e-7)


def test_only_planned_decoder_layers_are_hooked_and_vision_keeps_sdpa(image_dir, samples):
    _, model, _, _ = _setup("qwen2_5_vl", image_dir, samples)
    use_capture_attention(model)
    assert model.config.get_text_config()._attn_implementation == ATTENTION_NAME
    assert model.config.vision_config._attn_implementation == "sdpa"
    layers = FAMILIES["qwen2_5_vl"].decoder_layers(model)
    with AttentionRecorder(model, CapturePlan.of(tv=[1]), grad=False):
        hooked = [name for name, module in model.named_modules() if hasattr(module, "_drivekd_recorder")]
        assert hooked == [n for n, m in model.named_modules() if m is layers[1].self_attn]
    assert not any(hasattr(m, "_drivekd_recorder") for m in model.modules())


def test_misuse_gives_clear_errors(image_dir, samples):
    _, model, batch, _ = _setup("qwen2_5_vl", image_dir, samples)
    with pytest.raises(CaptureError, match="out of range"):
        AttentionRecorder(model, CapturePlan.of(full=[99]), grad=True)
    with (
        pytest.raises(CaptureError, match="use_capture_attention"),
        AttentionRecorder(model, CapturePlan.of(full=[0]), grad=True),
    ):
        pass
    use_capture_attention(model)
    with AttentionRecorder(model, CapturePlan.of(tv=[0]), grad=True) as recorder:
        with pytest.raises(CaptureError, match="TVIndex"):
            recorder.start()
        with pytest.raises(CaptureError, match="without start"):
            model(**batch.inputs)


@pytest.mark.parametrize("block_rows", [64, 2])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_head_mean_probs_backward_equals_autograd_reference(kv_heads, block_rows, monkeypatch):
    """The hand-written backward equals autograd through softmax().mean(), with GQA and fully masked rows, in one
    block of query rows or several (a ragged last block), and under a vmapped backward with K cotangents."""
    from drivekd.capture import maps
    from drivekd.capture.maps import HeadMeanProbs

    monkeypatch.setattr(maps, "BACKWARD_ROWS", block_rows)

    gen = torch.Generator().manual_seed(kv_heads)
    batch, heads, rows, keys, dim = 2, 4, 5, 7, 3
    query = torch.randn(batch, heads, rows, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    key = torch.randn(batch, kv_heads, keys, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    allowed = torch.rand(batch, rows, keys, generator=gen) > 0.3
    allowed[0, 1] = False  # a fully masked row (a padding query)
    weights = torch.randn(batch, rows, keys, dtype=torch.float64, generator=gen)

    def reference(q, k):
        expanded = k.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ expanded.transpose(-1, -2)) * 0.7
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        return scores.softmax(-1).mean(1)

    ours = HeadMeanProbs.apply(query, key, allowed, 0.7)
    torch.testing.assert_close(ours, reference(query, key), rtol=0, atol=1e-15)
    grads = torch.autograd.grad((ours * weights).sum(), (query, key))
    expected = torch.autograd.grad((reference(query, key) * weights).sum(), (query, key))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda q, k: HeadMeanProbs.apply(q, k, allowed, 0.7), (query, key))
    cotangents = torch.randn(3, batch, rows, keys, dtype=torch.float64, generator=gen)
    again = HeadMeanProbs.apply(query, key, allowed, 0.7)
    batched = torch.autograd.grad(again, (query, key), cotangents, is_grads_batched=True)
    for i, cotangent in enumerate(cotangents):
        looped = torch.autograd.grad(reference(query, key), (query, key), cotangent)
        for got, want in zip(batched, looped, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-14)


def test_a_consumer_gets_each_map_as_its_layer_runs_and_its_gradient_just_in_time(image_dir, samples):
    """Losses built by a consumer sit at their layers: each map's gradient arrives after the gradient of its
    layer's output, not (as for losses built after the forward) before the backward reaches any layer."""
    _, model, batch, index = _setup("qwen2_5_vl", image_dir, samples, dtype=torch.float64)
    decoder = FAMILIES["qwen2_5_vl"].decoder_layers(model)
    plan = CapturePlan.of(tv=[0], full=range(1, len(decoder) - 1), fuse=True)
    use_capture_attention(model)

    def run(streaming: bool):
        events, handles, losses, layers_run = [], [], [], []
        consumed: dict[tuple[str, int], torch.Tensor] = {}

        def on_layer(k):
            def hook(module, args, output):
                layers_run.append(k)
                hidden = output if isinstance(output, torch.Tensor) else output[0]
                hidden.register_hook(lambda g: events.append(("layer", k)))

            return hook

        def consumer(layer, kind, maps):
            assert layers_run[-1] == layer - 1 if layer else not layers_run  # called inside layer `layer`
            maps.register_hook(lambda g: events.append((kind, layer)))
            consumed[kind, layer] = maps.detach()
            losses.append(maps.pow(2).sum())

        handles = [layer.register_forward_hook(on_layer(k)) for k, layer in enumerate(decoder)]
        with AttentionRecorder(model, plan, grad=True) as recorder:
            recorder.start(index, consumer=consumer if streaming else None)
            logits = model(**batch.inputs).logits
            captured = recorder.collect()
        losses.append(logits.sum() * 1e-3)  # every layer's output gets a gradient
        for handle in handles:
            handle.remove()
        if not streaming:
            for kind, maps in (("full", captured.full), ("tv", captured.tv)):
                for layer, m in sorted(maps.items()):
                    m.register_hook(lambda g, kind=kind, layer=layer: events.append((kind, layer)))
                    losses.append(m.pow(2).sum())
        sum(losses).backward()
        return events, captured, consumed

    streamed, captured, consumed = run(streaming=True)
    deferred, reference, _ = run(streaming=False)
    assert not captured.full and not captured.tv  # a consumed map is not kept by the recorder
    for layer, maps in reference.full.items():
        torch.testing.assert_close(consumed["full", layer], maps, rtol=0, atol=0)
    torch.testing.assert_close(consumed["tv", 0], reference.tv[0], rtol=0, atol=0)
    # Deferred: a t-v block recomputed after the forward gets its gradient before the backward reaches any layer.
    first_layer_grad = deferred.index(next(e for e in deferred if e[0] == "layer"))
    assert deferred.index(("tv", 0)) < first_layer_grad
    # A full map computed with its layer's output (fused) sits at its layer either way; a streamed t-v block too.
    for events in (streamed, deferred):
        for k in reference.full:  # after the gradient of layer k's output, before layer k-1's
            assert events.index(("layer", k)) < events.index(("full", k)) < events.index(("layer", k - 1))
    assert streamed.index(("layer", 0)) < streamed.index(("tv", 0))


def test_a_consumer_is_refused_under_gradient_checkpointing(image_dir, samples):
    _, model, _, index = _setup("qwen2_5_vl", image_dir, samples)
    use_capture_attention(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with (
        AttentionRecorder(model, CapturePlan.of(full=[1]), grad=True) as recorder,
        pytest.raises(CaptureError, match="gradient checkpointing"),
    ):
        recorder.start(index, consumer=lambda *a: None)


@pytest.mark.parametrize("block_rows", [64, 2])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_fused_attention_and_map_equal_eager_autograd(kv_heads, block_rows, monkeypatch):
    """Output and head-mean map from one set of probabilities (and the backward applying both gradients at once)
    equal eager attention through autograd: GQA, a padding row, one block or several, K batched cotangents."""
    from drivekd.capture import maps
    from drivekd.capture.maps import AttentionHeadMean

    monkeypatch.setattr(maps, "BACKWARD_ROWS", block_rows)
    gen = torch.Generator().manual_seed(10 + kv_heads)
    batch, heads, length, dim = 2, 4, 6, 3
    shape = {"dtype": torch.float64, "generator": gen, "requires_grad": True}
    query = torch.randn(batch, heads, length, dim, **shape)
    key = torch.randn(batch, kv_heads, length, dim, **shape)
    value = torch.randn(batch, kv_heads, length, dim, **shape)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1).clone()
    allowed[1, :, :2] = False  # left padding of two positions in the second sample
    allowed[1, :2] = False  # the padding queries attend nothing
    out_weights = torch.randn(batch, heads, length, dim, dtype=torch.float64, generator=gen)
    map_weights = torch.randn(batch, length, length, dtype=torch.float64, generator=gen)

    def reference(q, k, v):
        groups = heads // kv_heads
        scores = (q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2)) * 0.7
        probs = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min).softmax(-1)
        return probs @ v.repeat_interleave(groups, dim=1), probs.mean(1)

    def loss(out, head_mean):
        return (out * out_weights).sum() + (head_mean * map_weights).sum()

    inputs = (query, key, value)
    ours = AttentionHeadMean.apply(*inputs, allowed, 0.7)
    for got, want in zip(ours, reference(*inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    grads = torch.autograd.grad(loss(*ours), inputs)
    expected = torch.autograd.grad(loss(*reference(*inputs)), inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *x: AttentionHeadMean.apply(*x, allowed, 0.7), inputs)
    out_cot = torch.randn(3, *out_weights.shape, dtype=torch.float64, generator=gen)
    map_cot = torch.randn(3, *map_weights.shape, dtype=torch.float64, generator=gen)
    again = AttentionHeadMean.apply(*inputs, allowed, 0.7)
    batched = torch.autograd.grad(again, inputs, (out_cot, map_cot), is_grads_batched=True)
    for i in range(3):
        looped = torch.autograd.grad(reference(*inputs), inputs, (out_cot[i], map_cot[i]))
        for got, want in zip(batched, looped, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-14)


def test_fused_attention_is_bitwise_reproducible_over_allocator_garbage(monkeypatch):
    """Every element of the fused output, map and gradients is computed, none read from uninitialised memory: a run
    after the allocator has handed out and taken back NaN-filled blocks equals the first bitwise (several row blocks
    with per-block key limits, GQA, a padded sample, batched cotangents)."""
    from drivekd.capture import maps
    from drivekd.capture.maps import AttentionHeadMean

    monkeypatch.setattr(maps, "BACKWARD_ROWS", 8)
    gen = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 37, 8
    query = torch.randn(batch, heads, length, dim, generator=gen, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, generator=gen, requires_grad=True)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1).clone()
    allowed[1, :, :3] = False  # left padding of three positions in the second sample
    allowed[1, :3] = False
    out_cot = torch.randn(3, batch, heads, length, dim, generator=gen)
    map_cot = torch.randn(3, batch, length, length, generator=gen)

    def run():
        out, head_mean = AttentionHeadMean.apply(query, key, value, allowed, 0.3)
        grads = torch.autograd.grad((out, head_mean), (query, key, value), (out_cot[0], map_cot[0]))
        again = AttentionHeadMean.apply(query, key, value, allowed, 0.3)
        batched = torch.autograd.grad(again, (query, key, value), (out_cot, map_cot), is_grads_batched=True)
        return [out.detach(), head_mean.detach(), *grads, *batched]

    first = run()
    for _ in range(3):
        garbage = [torch.full((size,), float("nan")) for size in range(16, 1 << 15, 97)]
        del garbage
        for got, want in zip(run(), first, strict=True):
            assert torch.equal(got, want)


def test_fused_attention_runs_in_fp32_under_autocast():
    """Under bf16 autocast the scores, probabilities and map stay fp32 (the output returns in q's dtype)."""
    from drivekd.capture.maps import attention_with_head_mean

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    exact_out, exact_map = attention_with_head_mean(q, k, v, None, 0.5)
    with torch.autocast("cpu", torch.bfloat16):
        out, head_mean = attention_with_head_mean(q, k, v, None, 0.5)
    assert head_mean.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(head_mean, exact_map, rtol=0, atol=0)
    torch.testing.assert_close(out, exact_out, rtol=0, atol=0)


def test_whole_map_layers_fuse_output_and_map_only_outside_checkpointing(image_dir, samples):
    """Without checkpointing a full-map layer skips the SDPA call (one computation gives output and map); under
    checkpointing or autocast, or for t-v-only layers, SDPA computes the output and the map is recomputed."""
    from drivekd.capture import recorder as recorder_module

    _, model, batch, index = _setup("qwen2_5_vl", image_dir, samples)
    layers = len(FAMILIES["qwen2_5_vl"].decoder_layers(model))
    plan = CapturePlan.of(tv=[0], full=range(1, layers - 1), fuse=True)
    calls = []
    sdpa = recorder_module.sdpa_attention_forward

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    for checkpointing, autocast in ((False, False), (True, False), (False, True)):
        calls.clear()
        m = copy.deepcopy(model)
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with (
            pytest.MonkeyPatch.context() as patch,
            torch.autocast("cpu", torch.bfloat16, enabled=autocast),
        ):
            patch.setattr(recorder_module, "sdpa_attention_forward", counting)
            _captured(m, plan, batch, index)
        expected = set(range(layers)) if checkpointing or autocast else {0, layers - 1}
        assert set(calls) == expected
