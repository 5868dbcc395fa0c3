"""The gated filter layer: two filter banks (frozen pre-trained, trainable copy) mixed per example and filter.

Travels to the Hub as remote code: relative imports only, nothing beyond torch/transformers.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .gating import GateController


class GatedLayer(nn.Module):
    """Wraps a conv (any subclass, grouped, depthwise) or a pointwise Linear, PEFT-style.

    `base_layer` is the original module, frozen; its own `forward` runs, so weight-standardised or padded convs keep
    working. `finetuned_layer` is a trainable copy. Where a BatchNorm directly followed the conv, the layer owns it:
    with gated norm each bank gets its own BatchNorm (their statistics differ once the copy trains), otherwise one
    BatchNorm normalises the mixture. Unknown attribute reads fall through to `base_layer` (padding helpers read
    `.stride`, `.kernel_size`).
    """

    def __init__(
        self, base_layer: nn.Module, norm: nn.BatchNorm2d | None = None, gated_norm: bool = True
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.finetuned_layer = copy.deepcopy(base_layer)
        self.base_norm = norm
        self.finetuned_norm = copy.deepcopy(norm) if norm is not None and gated_norm else None
        self.base_layer.requires_grad_(False)
        self.finetuned_layer.requires_grad_(True)
        # Linear layers see channels-last input (ConvNeXt's pointwise convs); convs see NCHW.
        self.channels_last = isinstance(base_layer, nn.Linear)
        self.layer_index = -1
        self._controller: tuple[GateController, ...] = ()

    def attach(self, controller: GateController, layer_index: int) -> None:
        # A tuple keeps the shared controller out of this module's children (it is registered once, on the model).
        self._controller = (controller,)
        self.layer_index = layer_index

    @property
    def in_channels(self) -> int:
        layer = self.base_layer
        return layer.in_features if self.channels_last else layer.in_channels

    @property
    def out_channels(self) -> int:
        layer = self.base_layer
        return layer.out_features if self.channels_last else layer.out_channels

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Global average of the input, (batch, in_channels): what the gate network reads."""
        if self.channels_last:
            return hidden_states.mean(dim=tuple(range(1, hidden_states.ndim - 1)))
        return hidden_states.mean(dim=(2, 3))

    def broadcast(self, gates: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channels_last:
            return gates.view(gates.shape[0], *([1] * (ndim - 2)), gates.shape[1])
        return gates.view(*gates.shape, *([1] * (ndim - 2)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._controller:
            raise RuntimeError(
                "GatedLayer is not attached to a gate controller; build it through AdaFilterModel."
            )
        gates = self._controller[0](self.layer_index, self.pool(hidden_states))
        pretrained = self.base_layer(hidden_states)
        finetuned = self.finetuned_layer(hidden_states)
        if self.finetuned_norm is not None:
            pretrained = self.base_norm(pretrained)
            finetuned = self.finetuned_norm(finetuned)
        gates = self.broadcast(gates.to(pretrained.dtype), pretrained.ndim)
        # Written so that a gate of exactly 0 (1) returns the pre-trained (fine-tuned) output bit for bit.
        mixed = pretrained * (1 - gates) + finetuned * gates
        if self.base_norm is not None and self.finetuned_norm is None:
            mixed = self.base_norm(mixed)
        return mixed

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, gated_norm={self.finetuned_norm is not None}"
