"""Teacher signals from a live teacher forward (under no_grad, attention captured without gradients)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import Batch
from drivekd.data.roles import TVIndex
from drivekd.signals.types import SignalNeeds, TeacherSignals


class LiveTeacher:
    """Run the teacher on the student's batch (the pair's token layouts were checked to be identical).

    One forward yields every needed signal, so the three capability teachers of the paper cost one forward when
    they share a model.
    """

    def __init__(self, model: PreTrainedModel, *, chunk_size: int = 256) -> None:
        self.model = model.eval()
        self.chunk_size = chunk_size
        use_capture_attention(model)

    @torch.no_grad()
    def signals(self, batch: Batch, index: TVIndex, needs: SignalNeeds) -> TeacherSignals:
        plan = CapturePlan.of(tv=needs.tv_layers, full=needs.full_layers, chunk_size=self.chunk_size)
        with AttentionRecorder(self.model, plan, grad=False) as recorder:
            recorder.start(index if plan.tv_layers else None)
            out = self.model(**batch.inputs, output_hidden_states=bool(needs.hidden_layers))
            captured = recorder.collect()
        hidden = {layer: out.hidden_states[layer] for layer in needs.hidden_layers}
        return TeacherSignals(index, captured.tv, captured.full, hidden, out.logits if needs.logits else None)
