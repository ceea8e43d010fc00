"""Drive-KD losses as pure functions of maps, masks, hidden states and logits (paper eqs. 9-17, 30-35)."""

from drivekd.losses.attention import (
    full_attention_cosine,
    full_attention_cosine_map,
    full_attention_mse,
    head_mean,
    layer_mean,
    masked_mean,
    reasoning_attention_loss,
    text_to_vision_cosine,
    text_to_vision_cosine_blocks,
    text_to_vision_mse,
    text_to_vision_mse_blocks,
)
from drivekd.losses.groups import (
    group_targets,
    mid_layers,
    paper_layer_to_index,
    penultimate_layer,
    reasoning_layers,
    teacher_layer_groups,
)
from drivekd.losses.hidden import HiddenProjector, grouped_hidden_mse, hidden_mse
from drivekd.losses.logits import answer_kl
from drivekd.losses.supervised import IGNORE_INDEX, answer_logits, supervised_loss, token_nll

__all__ = [
    "IGNORE_INDEX",
    "HiddenProjector",
    "answer_kl",
    "answer_logits",
    "full_attention_cosine",
    "full_attention_cosine_map",
    "full_attention_mse",
    "group_targets",
    "grouped_hidden_mse",
    "head_mean",
    "hidden_mse",
    "layer_mean",
    "masked_mean",
    "mid_layers",
    "paper_layer_to_index",
    "penultimate_layer",
    "reasoning_attention_loss",
    "reasoning_layers",
    "supervised_loss",
    "teacher_layer_groups",
    "text_to_vision_cosine",
    "text_to_vision_cosine_blocks",
    "text_to_vision_mse",
    "text_to_vision_mse_blocks",
    "token_nll",
]
