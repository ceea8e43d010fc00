"""A registered attention implementation that records head-mean maps at chosen decoder layers.

The layer output is computed by transformers' own SDPA path; at the planned layers the head-mean probabilities
(eq. 10) are recomputed from q and k (see :mod:`drivekd.capture.maps`) in one of two modes:

* ``tv``: text-query rows x vision-key columns (the eq. 12 block), for the perception and planning signals;
* ``full``: the whole L x L map in query chunks whose probabilities are recomputed in backward, for reasoning.

One exception (``CapturePlan.fuse``, on by default): a student's ``full`` layer in fp32/fp64 compute outside checkpointing takes its output and
its map from one computation (:func:`drivekd.capture.maps.attention_with_head_mean`), eager attention that equals
SDPA to round-off, at about the cost of the SDPA call alone (:meth:`AttentionRecorder.fuses`).

A teacher (``grad=False``) computes its maps inside the layer call. A student (``grad=True``) only keeps references
to the layer's q and k there and computes the maps in :meth:`AttentionRecorder.collect`, outside the layer. That is
what makes non-reentrant gradient checkpointing exact: the checkpointed layer does the same work in its forward and
in its backward replay (checkpoint checks the saved-tensor count), the replay is recognised and not recorded (one
record per layer per forward), and gradients reach q and k through checkpoint's recomputation. Reentrant
checkpointing runs the forward under ``no_grad`` and would silently give the attention loss no gradient, so it is
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from drivekd.capture.maps import attention_with_head_mean, head_mean_rows
from drivekd.data.roles import TVIndex
from drivekd.errors import CaptureError
from drivekd.models.families import family_of

ATTENTION_NAME = "drivekd_capture"
_HOOK_ATTR = "_drivekd_recorder"


def _capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for the layer output, plus a record of the maps when a recorder is attached to this module.

    A student layer whose whole map is recorded outside gradient checkpointing gets its output and map from one
    set of probabilities (:func:`attention_with_head_mean`) instead.
    """
    recorder: AttentionRecorder | None = getattr(module, _HOOK_ATTR, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if recorder is not None and recorder.fuses(module.layer_idx, query, key, value, kwargs):
        output, full = attention_with_head_mean(query, key, value, attention_mask, scale)
        recorder.observe(module.layer_idx, query, key, attention_mask, scale, full=full)
        return output.transpose(1, 2).contiguous(), None
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if recorder is not None:
        recorder.observe(module.layer_idx, query, key, attention_mask, scale)
    return output, None


AttentionInterface.register(ATTENTION_NAME, _capture_attention_forward)
# Without a registered mask function the padding mask would be silently dropped for a custom name.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_capture_attention(model: PreTrainedModel) -> None:
    """Route the language model's attention through the capture implementation; the vision tower keeps SDPA."""
    model.set_attn_implementation({"text_config": ATTENTION_NAME, "vision_config": "sdpa"})


MapConsumer = Callable[[int, str, torch.Tensor], None]


@dataclass
class CapturedAttention:
    """Head-mean maps of one forward, keyed by 0-based decoder layer index.

    ``tv[layer]`` is (B, Tq, Vk) laid out by ``tv_index``; ``full[layer]`` is (B, L, L).
    """

    tv: dict[int, torch.Tensor] = field(default_factory=dict)
    full: dict[int, torch.Tensor] = field(default_factory=dict)
    tv_index: TVIndex | None = None


@dataclass(frozen=True)
class CapturePlan:
    """Which decoder layers (0-based) to record, and how."""

    tv_layers: frozenset[int] = frozenset()
    full_layers: frozenset[int] = frozenset()
    chunk_size: int = 256
    recompute: bool = True
    # Fused whole-map layers (:meth:`AttentionRecorder.fuses`); ``False`` gives SDPA plus a recomputed map.
    fuse: bool = True

    @classmethod
    def of(cls, tv: Iterable[int] = (), full: Iterable[int] = (), **kwargs: Any) -> CapturePlan:
        return cls(frozenset(tv), frozenset(full), **kwargs)

    @property
    def layers(self) -> frozenset[int]:
        return self.tv_layers | self.full_layers


class AttentionRecorder:
    """Attach to a model's decoder attention modules and collect maps, one :class:`CapturedAttention` per forward.

    Use as a context manager; call :meth:`start` before each forward (with the batch's :class:`TVIndex` when the
    plan has ``tv`` layers) and :meth:`collect` after it, before backward.

    A student's maps are computed at :meth:`collect` by default. With a ``consumer`` (see :meth:`start`) each is
    computed as its layer runs and handed over at once, so that a loss built from it sits at that layer in the
    autograd graph: the backward then creates each map's gradient just before the layer needs it, instead of all
    of them when it starts. A consumed map is not kept (:meth:`collect` returns only the maps nobody consumed), so
    the step holds no more of it than the consumer's loss saves.
    """

    def __init__(self, model: PreTrainedModel, plan: CapturePlan, *, grad: bool) -> None:
        self.model = model
        self.plan = plan
        self.grad = grad
        self.layers = family_of(model).decoder_layers(model)
        bad = sorted(i for i in plan.layers if not 0 <= i < len(self.layers))
        if bad:
            raise CaptureError(
                f"decoder layer indices {bad} out of range for a {len(self.layers)}-layer model"
            )
        self._result: CapturedAttention | None = None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = {}
        self._consumer: MapConsumer | None = None
        self._consumed: set[int] = set()  # layers handed to the consumer in this forward
        self._checkpointed = False

    def __enter__(self) -> AttentionRecorder:
        self._refuse_reentrant_checkpointing()
        impl = self.model.config.get_text_config()._attn_implementation
        if impl != ATTENTION_NAME:
            raise CaptureError(
                f"the language model uses attention {impl!r}; call use_capture_attention(model) first"
            )
        for index in self.plan.layers:
            setattr(self.layers[index].self_attn, _HOOK_ATTR, self)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for index in self.plan.layers:
            attn = self.layers[index].self_attn
            if getattr(attn, _HOOK_ATTR, None) is self:
                delattr(attn, _HOOK_ATTR)
        self._result = None

    def start(self, tv_index: TVIndex | None = None, consumer: MapConsumer | None = None) -> None:
        """Begin a forward; ``tv_index`` locates the text-to-vision block when the plan has ``tv`` layers.

        ``consumer(layer, kind, map)`` ("tv" or "full") receives each map as its layer runs. Not under gradient
        checkpointing: a checkpointed layer's replay would not recompute the map's saved tensors.
        """
        if self.plan.tv_layers and tv_index is None:
            raise CaptureError("the plan records text-to-vision blocks: pass the batch's TVIndex to start()")
        self._checkpointed = any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        if consumer is not None and self._checkpointed:
            raise CaptureError(
                "a map consumer cannot be used with gradient checkpointing; collect() the maps"
            )
        self._result = CapturedAttention(tv_index=tv_index)
        self._pending = {}
        self._consumer = consumer
        self._consumed = set()

    def collect(self) -> CapturedAttention:
        """The maps of the forward since :meth:`start` (computed now for a student)."""
        if self._result is None:
            raise CaptureError("collect() called without start()")
        result, pending = self._result, self._pending
        self._result, self._pending, self._consumer = None, {}, None
        for layer in sorted(pending):
            self._compute(layer, *pending[layer], into=result)
        missing = sorted(self.plan.layers - result.tv.keys() - result.full.keys() - self._consumed)
        if missing:
            raise CaptureError(f"no attention was recorded at decoder layers {missing}; did the forward run?")
        return result

    def fuses(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict[str, Any]
    ) -> bool:
        """Whether this student layer's output and full map come from one computation.

        Not under checkpointing: the maps are then computed outside the checkpointed layer (see the module doc).
        Not in low-precision compute (bf16/fp16 weights or autocast): the fused output is eager attention in fp32,
        which would differ from SDPA's bf16 output by more than round-off (and flash kernels are fast there).
        Not with attention dropout, a position bias, a soft cap, non-causal attention or a KV cache, which the fused
        kernel does not model.
        """
        return (
            self.plan.fuse
            and self.grad
            and self.plan.recompute
            and layer in self.plan.full_layers
            and not self._checkpointed
            and torch.is_grad_enabled()
            and query.shape[2] == key.shape[2]
            and all(t.dtype in (torch.float32, torch.float64) for t in (query, key, value))
            and not torch.is_autocast_enabled(query.device.type)
            and not options.get("dropout")
            and options.get("position_bias") is None
            and options.get("softcap") is None
            and options.get("is_causal") is not False
        )

    def observe(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        *,
        full: torch.Tensor | None = None,
    ) -> None:
        """Called by the attention implementation at a planned layer; ``full`` is the layer's map when the
        implementation computed it with the output (:meth:`fuses`)."""
        if torch._C._current_graph_task_id() != -1:
            return  # checkpoint's replay of a layer during backward: the first forward was recorded
        if self.grad and not torch.is_grad_enabled():
            raise CaptureError(
                "attention was captured for a student under no_grad: reentrant gradient checkpointing runs the "
                "forward without autograd, so the attention loss would get no gradient. Enable checkpointing with "
                "activation_checkpointing_kwargs={'use_reentrant': False}, or record with grad=False for inference."
            )
        if self._result is None:
            raise CaptureError("a forward ran with the recorder attached but without start()")
        if (
            layer in self._pending
            or layer in self._consumed | self._result.tv.keys() | self._result.full.keys()
        ):
            raise CaptureError(f"decoder layer {layer} was recorded twice in one forward")
        consumer = self._consumer if self.grad else None  # a teacher keeps its maps
        if full is None and self.grad and consumer is None:
            self._pending[layer] = (query, key, mask, scale)
            return
        into = self._result if consumer is None else CapturedAttention(tv_index=self._result.tv_index)
        if full is not None:
            self._place_full(layer, full, into=into)
        else:
            with nullcontext() if self.grad else torch.no_grad():
                self._compute(layer, query, key, mask, scale, into=into)
        if consumer is not None:
            for kind, kind_maps in (("full", into.full), ("tv", into.tv)):
                if layer in kind_maps:
                    consumer(layer, kind, kind_maps[layer])
            self._consumed.add(layer)

    def _compute(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        into: CapturedAttention,
    ) -> None:
        """Compute this layer's planned maps into ``into``; a layer planned both ways derives its block from the map."""
        options = {
            "chunk_size": self.plan.chunk_size,
            "recompute": self.plan.recompute and self.grad,
        }
        index = into.tv_index
        if layer in self.plan.full_layers:
            positions = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            self._place_full(layer, head_mean_rows(query, key, mask, positions, scale, **options), into=into)
            return
        rows = index.query_index.unsqueeze(1).unsqueeze(-1).expand(-1, query.shape[1], -1, query.shape[-1])
        maps = head_mean_rows(torch.gather(query, 2, rows), key, mask, index.query_index, scale, **options)
        into.tv[layer] = index.gather_keys(maps)

    def _place_full(self, layer: int, full: torch.Tensor, into: CapturedAttention) -> None:
        """Store a full map, and the text-to-vision block derived from it when the plan records both."""
        into.full[layer] = full
        if layer in self.plan.tv_layers:
            into.tv[layer] = into.tv_index.gather(full)

    def _refuse_reentrant_checkpointing(self) -> None:
        for layer in self.layers:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", {}) or {}
            if getattr(layer, "gradient_checkpointing", False) and keywords.get("use_reentrant", False):
                raise CaptureError(
                    "reentrant gradient checkpointing is enabled: the attention loss would get no gradient. Use "
                    "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})."
                )
