"""The gated filter layer: two filter banks (frozen pre-trained, trainable copy) mixed per example and filter.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .bank_ops import BankOp, SpatialMean, bank_op
from .batchnorm_ops import is_plain_batchnorm, uses_batch_statistics
from .gated_inference import (
    FoldedBanks,
    current_folded_banks,
    fold_banks,
    folded_forward,
    live_merged_forward,
)
from .gated_training import fused_layer_forward
from .gating import GateController, active_gate_forward
from .kernel_choice import prefer_live

_UNSUPPORTED = object()


def apply_gated_implementation(module: nn.Module, name: str) -> None:
    """Every gated layer under `module` (and its gate controller) runs implementation `name` from now on.

    "reference" is the definition: both banks as modules, two norms, a mix, module calls in the gate controller.
    "fused": training (and any forward that needs autograd) runs both banks, norms and mix in one autograd function
    (`gated_training.FusedGatedBanks`); inference (no grad, norms in eval mode) folds each norm into its bank and
    computes both banks, then selects. "merged": as "fused", but inference always uses per-example merged kernels
    (one conv per layer). "auto" (the default): "fused" in training, and in inference merged kernels, both banks or
    the agreement split per layer and batch by a cost model (`kernel_choice`). All but "reference" also use the lean gate controller. All give
    the reference's outputs and gradients up to float rounding (tests/test_fast_paths.py). Models keep theirs in
    `config.gated_implementation` (`model.set_gated_implementation`).
    """
    _forward_of(name)  # an unknown name fails before any layer changes
    for holder in _implementation_holders(module):
        holder.implementation = (
            name if isinstance(holder, GatedLayer) else ("reference" if name == "reference" else "auto")
        )


@contextlib.contextmanager
def gated_implementation(module: nn.Module, name: str) -> Iterator[None]:
    """`apply_gated_implementation(module, name)` inside the block; each layer gets its own setting back after."""
    previous = [(holder, holder.implementation) for holder in _implementation_holders(module)]
    apply_gated_implementation(module, name)
    try:
        yield
    finally:
        for holder, implementation in previous:
            holder.implementation = implementation


def _implementation_holders(module: nn.Module) -> list[nn.Module]:
    """The gated layers and gate controllers under `module`."""
    return [child for child in module.modules() if isinstance(child, GatedLayer | GateController)]


class GatedLayer(nn.Module):
    """Wraps a conv (any subclass, grouped, depthwise) or a pointwise Linear, PEFT-style.

    `base_layer` is the original module (the pre-trained bank); its own `forward` runs, so weight-standardised or
    padded convs keep working. `finetuned_layer` is a copy to train. Which of them trains is the model's rule
    (`freeze_pretrained_bank`: the pre-trained bank is frozen). Where a BatchNorm directly followed the
    conv, the layer owns it: with gated norm each bank gets its own BatchNorm (their statistics differ once the copy
    trains), otherwise one BatchNorm normalises the mixture. Unknown attribute reads fall through to `base_layer`
    (padding helpers read `.stride`, `.kernel_size`). Its gates come from the forward of the model it runs in
    (`gating.active_gate_forward`): the layer holds no reference to a controller, so copies and replicas of the
    model use their own.

    `implementation` picks the forward from `GATED_FORWARDS` (set per model: `apply_gated_implementation`). Layers
    whose modules the fast paths cannot replicate exactly (custom conv forwards, norms other than plain BatchNorm) run
    the reference forward whatever it says.
    """

    # Set by transformers' `activation_checkpointing_enable()` (or its deprecated alias `gradient_checkpointing_enable()`).
    gradient_checkpointing: bool = False
    _folded: FoldedBanks | None = None
    _op: object = None

    def __init__(
        self,
        base_layer: nn.Module,
        norm: nn.BatchNorm2d | None = None,
        gated_norm: bool = True,
        weight_standardization_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.finetuned_layer = copy.deepcopy(base_layer)
        self.base_norm = norm
        self.finetuned_norm = copy.deepcopy(norm) if norm is not None and gated_norm else None
        # Linear layers see channels-last input (ConvNeXt's pointwise convs); convs see NCHW.
        self.channels_last = isinstance(base_layer, nn.Linear)
        self.layer_index = 0  # this layer's position in the gate controller (set by the model)
        # Set where the family's conv standardises its weights (BiT): the fast paths then do the same.
        self.weight_standardization_eps = weight_standardization_eps
        self.implementation = "auto"

    @property
    def implementation(self) -> str:
        """The name of this layer's forward in `GATED_FORWARDS`; setting it looks the function up once."""
        return self._implementation

    @implementation.setter
    def implementation(self, name: str) -> None:
        self._gated_forward = _forward_of(name)
        self._implementation = name

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

    def _fast_pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`pool` with a backward that does not materialise a full-size gradient (see SpatialMean)."""
        if not (torch.is_grad_enabled() and hidden_states.requires_grad):
            return self.pool(hidden_states)
        dims = tuple(range(1, hidden_states.ndim - 1)) if self.channels_last else (2, 3)
        return SpatialMean.apply(hidden_states, dims)

    def broadcast(self, gates: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channels_last:
            return gates.view(gates.shape[0], *([1] * (ndim - 2)), gates.shape[1])
        return gates.view(*gates.shape, *([1] * (ndim - 2)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        forward = self._gated_forward
        pooled = self.pool(hidden_states) if forward is reference_forward else self._fast_pool(hidden_states)
        gates = active_gate_forward().step(self.layer_index, pooled)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The gates are decided once, outside; only the banks, norms and mix are recomputed in backward.
            return self._gradient_checkpointing_func(_RecomputableBanks(self, forward), hidden_states, gates)
        return forward(self, hidden_states, gates)

    def _reference_forward(self, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The definition: both banks as their own modules, each normalised by its own norm, mixed per filter."""
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

    # ------------------------------------------------------------------ fast paths

    def _bank_op(self) -> BankOp | None:
        """The banks as a functional op, or None where only the reference forward is exact; analysed once (module
        types do not change)."""
        op = self._op
        if op is None:
            finetuned, base, *norms = self.bank_modules()
            op = bank_op(base, self.weight_standardization_eps)
            same_type = type(finetuned) is type(base)
            if op is None or not same_type or not all(is_plain_batchnorm(n) for n in norms if n is not None):
                op = _UNSUPPORTED
            self._op = op
        return None if op is _UNSUPPORTED else op

    def bank_modules(self) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module | None]:
        """(finetuned_layer, base_layer, finetuned_norm, base_norm), read from the module dict."""
        modules = self._modules
        return (
            modules["finetuned_layer"],
            modules["base_layer"],
            modules.get("finetuned_norm"),
            modules.get("base_norm"),
        )

    def _current_folded(self, op: BankOp) -> FoldedBanks:
        """Both banks with their eval-mode norms folded in, cached between calls while they stay current. Without
        gated norm the shared norm follows the mix; it folds into both banks alike."""
        finetuned, base, finetuned_norm, base_norm = self.bank_modules()
        norms = (finetuned_norm, base_norm) if finetuned_norm is not None else (base_norm, base_norm)
        modules = (finetuned, base, *norms)
        if torch.compiler.is_compiling():
            return fold_banks(op, *modules)
        check_content = active_gate_forward().folded_weights_check == "content"
        self._folded = current_folded_banks(self._folded, op, modules, check_content)
        return self._folded

    def train(self, mode: bool = True) -> GatedLayer:
        if mode:
            # Training moves the banks: drop the folded copy rather than keep it in memory.
            self._folded = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._folded = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the inference cache behind: it is rebuilt on demand (and holds a lock)."""
        state = super().__getstate__()
        state.pop("_folded", None)
        return state

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, gated_norm={self.finetuned_norm is not None}"


class _RecomputableBanks:
    """A gated layer's bank computation for activation checkpointing: the recomputation in backward leaves the
    BatchNorm running statistics as the forward left them (they would otherwise take a second update)."""

    def __init__(self, layer: GatedLayer, forward: Callable) -> None:
        self.layer, self.forward, self.calls = layer, forward, 0

    def __call__(self, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.forward(self.layer, hidden_states, gates)
        buffers = [b for b in self.layer.buffers() if b is not None]
        saved = [b.clone() for b in buffers]
        try:
            return self.forward(self.layer, hidden_states, gates)
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)


def reference_forward(layer: GatedLayer, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """"reference": the definition, module by module."""
    return layer._reference_forward(hidden_states, gates)


def _fast_forward(layer: GatedLayer, hidden_states: torch.Tensor, gates: torch.Tensor, kernel: str) -> torch.Tensor:
    """With autograd: both banks, norms and mix in one function (`gated_training`); without (norms in eval mode):
    the folded banks through inference `kernel` (`gated_inference`); the reference wherever neither is exact."""
    op = layer._bank_op()
    if op is not None and hidden_states.shape[0] > 0:  # an empty batch: the reference modules return it empty
        modules = layer.bank_modules()
        norms = [norm for norm in modules[2:] if norm is not None]
        if not torch.is_grad_enabled() and not any(uses_batch_statistics(norm) for norm in norms):
            hidden_states = op.prepare(modules[1], hidden_states)
            if kernel != "two_bank" and prefer_live(modules[1].weight, hidden_states.shape[0]):
                live = live_merged_forward(op, hidden_states, gates, modules) if active_gate_forward().hard else None
                if live is not None:
                    return live
            return folded_forward(op, hidden_states, gates, layer._current_folded(op), kernel)
        # Under torch.compile the fused function's hand-written backward would break the graph at every layer: the
        # reference formulation is traced whole instead, and inductor fuses it itself.
        if not torch.compiler.is_compiling():
            mixed = fused_layer_forward(op, *modules, hidden_states, gates)
            if mixed is not None:
                return mixed
    return layer._reference_forward(hidden_states, gates)


def fused_forward(layer: GatedLayer, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """"fused": the fused training function; in inference both folded banks and a select."""
    return _fast_forward(layer, hidden_states, gates, "two_bank")


def merged_forward(layer: GatedLayer, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """"merged": the fused training function; in inference per-example merged kernels, one conv per layer."""
    return _fast_forward(layer, hidden_states, gates, "merged")


def auto_forward(layer: GatedLayer, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """"auto" (the default): the fused training function; in inference merged or two-bank by the cost model."""
    return _fast_forward(layer, hidden_states, gates, "auto")


# The implementations of a gated layer's forward, by name (`config.gated_implementation`); each maps
# (layer, input, gates) to the mixed output, and all give the reference's up to float rounding.
GATED_FORWARDS: dict[str, Callable[[GatedLayer, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "reference": reference_forward,
    "fused": fused_forward,
    "merged": merged_forward,
    "auto": auto_forward,
}


def _forward_of(name: str) -> Callable[[GatedLayer, torch.Tensor, torch.Tensor], torch.Tensor]:
    forward = GATED_FORWARDS.get(name)
    if forward is None:
        raise ValueError(f"implementation must be one of {tuple(GATED_FORWARDS)}, got {name!r}.")
    return forward
