"""What AdaFilter models return: transformers' vision outputs plus each gated layer's decisions.

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)


@dataclass
class AdaFilterModelOutput(BaseModelOutputWithPoolingAndNoAttention):
    r"""
    gates (`tuple(torch.FloatTensor)`):
        One tensor of shape `(batch_size, out_channels)` per gated layer (in `model.gated_layer_names` order): 1.0
        where the example used the fine-tuned filter, 0.0 where it used the pre-trained one.
    gate_probs (`tuple(torch.FloatTensor)`, *optional*, returned in training):
        The gate network's probability of choosing the fine-tuned filter, same shapes as `gates`.
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    gate_probs: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class AdaFilterImageClassifierOutput(ImageClassifierOutputWithNoAttention):
    r"""
    gates (`tuple(torch.FloatTensor)`):
        One tensor of shape `(batch_size, out_channels)` per gated layer: 1.0 = fine-tuned filter, 0.0 = pre-trained.
    gate_probs (`tuple(torch.FloatTensor)`, *optional*, returned in training):
        The gate network's probability of choosing the fine-tuned filter, same shapes as `gates`.
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    gate_probs: tuple[torch.FloatTensor, ...] | None = None
