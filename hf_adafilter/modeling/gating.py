"""The gate controller: one recurrent network shared by all gated layers of a model.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Keeps log(u) and log(1 - u) finite for the logistic noise.
_NOISE_EPS = 1e-6


def straight_through_gates(
    log_odds: torch.Tensor,
    temperature: float,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hard 0/1 samples whose gradient is that of the relaxed (Gumbel-softmax) sample.

    With two classes, Gumbel-softmax over logits (a, b) equals sigmoid((b - a + L) / t) with L ~ Logistic(0, 1),
    so one noise draw per filter suffices. The temperature only reshapes the gradient: which bank is chosen is
    `log_odds + L > 0` at any temperature. `noise_scale` multiplies L, so annealing it to 0 makes the training
    decisions converge to the evaluation decisions (`log_odds > 0`). `hard + (soft - soft.detach())` is exactly 0
    or 1 in value (x - x == 0), unlike `hard - soft.detach() + soft`, which can round to 0.99999994. The noise
    draws from `generator` when given (on the log-odds' device), so they leave the global RNG, which the data
    augmentation and dropout draw from, exactly where a model without gates would leave it.
    """
    noisy = log_odds
    if noise_scale > 0:
        uniform = torch.rand(
            log_odds.shape, generator=generator, dtype=log_odds.dtype, device=log_odds.device
        ).clamp_(_NOISE_EPS, 1.0 - _NOISE_EPS)
        noisy = log_odds + noise_scale * (torch.log(uniform) - torch.log1p(-uniform))
    soft = torch.sigmoid(noisy / temperature)
    hard = (noisy > 0).to(soft.dtype)
    return hard + (soft - soft.detach())


_State = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


class GateController(nn.Module):
    """Decides, per example and per output filter of every gated layer, which bank to use.

    Gated layers call it, through the forward's `GateForward`, in the order the backbone runs them; each call steps
    the shared recurrent cell once, so a layer's decisions depend on what earlier layers saw and chose (the paper's
    LSTM gate network). It holds parameters and settings only: the recurrent state of a forward is passed in and
    out, so concurrent forwards (threads, DataParallel replicas) cannot mix theirs.

    `implementation` "auto" steps the cell and the linear maps through their functional forms (the same ATen calls
    as the modules, so the same numbers bit for bit) without the module-call overhead, which dominates at batch 1
    where every layer waits for its gates; "reference" calls the modules.
    """

    implementation: str = "auto"

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        network: str = "lstm",
        input_size: int = 64,
        hidden_size: int = 64,
        temperature: float = 1.0,
        noise_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.out_channels = tuple(out_channels)
        self.input_projections = nn.ModuleList(nn.Linear(channels, input_size) for channels in in_channels)
        if network == "lstm":
            self.cell: nn.Module | None = nn.LSTMCell(input_size, hidden_size)
        elif network == "gru":
            self.cell = nn.GRUCell(input_size, hidden_size)
        elif network == "independent":
            self.cell = None
        else:
            raise ValueError(f"gate network must be 'lstm', 'gru' or 'independent', got {network!r}.")
        head_size = input_size if self.cell is None else hidden_size
        # One log-odds per filter (fine-tuned vs pre-trained): the paper's two logits per filter enter the
        # decision only through their difference, so this is the same function class with half the head. The
        # head's bias is the filter's learnable prior; the weights add the per-example term.
        self.heads = nn.ModuleList(nn.Linear(head_size, channels) for channels in out_channels)
        self.temperature = float(temperature)
        self.noise_scale = float(noise_scale)
        self.forced_value: float | None = None
        # The training noise's own RNG (None: the global one); the trainer seeds one per run.
        self.noise_generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.heads)

    def forward(
        self, index: int, pooled: torch.Tensor, state: _State = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, _State]:
        """(gates, probs, state) of layer `index`: gates (batch, out_channels) exactly 0.0 or 1.0 from its pooled
        input and the recurrent `state` the previous layer left; in training also the probabilities of F (else
        None); and the state for the next layer."""
        if self.forced_value is not None:
            return pooled.new_full((pooled.shape[0], self.out_channels[index]), self.forced_value), None, state
        if self.implementation == "reference" or getattr(self, "_is_replica", False):  # a replica's parameters are attributes
            log_odds, state = self._reference_log_odds(index, pooled, state)
        else:
            log_odds, state = self._log_odds(index, pooled, state)
        if self.training:
            gates = straight_through_gates(log_odds, self.temperature, self.noise_scale, self.noise_generator)
            return gates, torch.sigmoid(log_odds), state
        return (log_odds > 0).to(log_odds.dtype), None, state

    def _reference_log_odds(
        self, index: int, pooled: torch.Tensor, state: _State
    ) -> tuple[torch.Tensor, _State]:
        features = self.input_projections[index](pooled)
        if isinstance(self.cell, nn.LSTMCell):
            state = self.cell(features, state)
            features = state[0]
        elif isinstance(self.cell, nn.GRUCell):
            state = features = self.cell(features, state)
        else:
            features = torch.relu(features)
        return self.heads[index](features), state

    def _log_odds(self, index: int, pooled: torch.Tensor, state: _State) -> tuple[torch.Tensor, _State]:
        """`_reference_log_odds` with the modules' forwards inlined: identical ATen calls, identical numbers, but
        no module-call and attribute-lookup overhead (about half the controller's time at batch 1)."""
        projection, head = self._parameter_tables()[index]
        features = F.linear(pooled, projection["weight"], projection["bias"])
        cell = self.cell
        if cell is None:
            features = torch.relu(features)
        else:
            weights = cell._parameters
            lstm = isinstance(cell, nn.LSTMCell)
            if state is None:
                zeros = features.new_zeros(features.shape[0], cell.hidden_size)
                state = (zeros, zeros) if lstm else zeros
            step = torch.lstm_cell if lstm else torch.gru_cell
            state = step(
                features,
                state,
                weights["weight_ih"],
                weights["weight_hh"],
                weights["bias_ih"],
                weights["bias_hh"],
            )
            features = state[0] if lstm else state
        return F.linear(features, head["weight"], head["bias"]), state

    def _parameter_tables(self) -> list[tuple[dict, dict]]:
        """Each layer's (projection, head) parameter dicts; the dicts live as long as the modules, so parameters
        replaced later are still found."""
        tables = self.__dict__.get("_tables")
        if tables is None or len(tables) != len(self.heads):
            tables = [
                (projection._parameters, head._parameters)
                for projection, head in zip(self.input_projections, self.heads, strict=True)
            ]
            self.__dict__["_tables"] = tables
        return tables



class GateForward:
    """The gate state of one forward of one model: the controller that decides, the recurrent state between layers,
    and each layer's decisions. It is the thread's active one while the model's forward runs (`gate_forward`), so
    two threads, or DataParallel replicas (each with its own controller), never see each other's."""

    def __init__(self, controller: GateController, folded_weights_check: str = "content") -> None:
        self.controller = controller
        # The model's `config.folded_weights_check`, read by the gated layers' inference paths.
        self.folded_weights_check = folded_weights_check
        # Whether every gate is exactly 0 or 1 (the network's decisions are; a forced value may not be).
        self.hard = controller.forced_value is None or controller.forced_value in (0.0, 1.0)
        self.state: _State = None
        self.gates: list[torch.Tensor | None] = [None] * len(controller)
        self.probs: list[torch.Tensor | None] = [None] * len(controller)

    def step(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """The gates of layer `index`: one step of the controller from the state the previous layer left."""
        gates, probs, self.state = self.controller(index, pooled, self.state)
        self.gates[index], self.probs[index] = gates, probs
        return gates

    def collect(
        self, names: Sequence[str]
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """The decisions of this forward, in gated-layer order; fails if a gated layer never ran."""
        missing = [name for name, gates in zip(names, self.gates, strict=True) if gates is None]
        if missing:
            raise RuntimeError(
                f"Gated layers {missing[:3]} did not run in this forward; AdaFilter needs every gated layer "
                "to run exactly once per forward. Exclude them with `exclude_modules`."
            )
        probs = tuple(self.probs) if all(p is not None for p in self.probs) else None
        return tuple(self.gates), probs


# The forward in flight, per thread (DataParallel replicas run in threads). A thread-local rather than a context
# variable because torch.compile traces attribute reads and writes of a `threading.local` (not `ContextVar`), so
# eager and compiled forwards share this one mechanism.
_ACTIVE = threading.local()


def activate_gate_forward(
    controller: GateController, folded_weights_check: str = "content"
) -> tuple[GateForward, GateForward | None]:
    """A fresh `GateForward` of `controller`, made the active one of this thread; returns it and the previous one,
    which `deactivate_gate_forward` restores (forwards nest)."""
    forward = GateForward(controller, folded_weights_check)
    previous = getattr(_ACTIVE, "forward", None)
    _ACTIVE.forward = forward
    return forward, previous


def deactivate_gate_forward(previous: GateForward | None) -> None:
    _ACTIVE.forward = previous


@contextlib.contextmanager
def gate_forward(controller: GateController) -> Iterator[GateForward]:
    """A fresh `GateForward` of `controller` as the active one inside the block (per thread, nests)."""
    forward, token = activate_gate_forward(controller)
    try:
        yield forward
    finally:
        deactivate_gate_forward(token)


def active_gate_forward() -> GateForward:
    """The `GateForward` of the model forward that is running in this thread."""
    forward = getattr(_ACTIVE, "forward", None)
    if forward is None:
        raise RuntimeError(
            "A GatedLayer runs only inside the forward of its AdaFilterModel (or a `gating.gate_forward(controller)` "
            "block): call the model, not the layer."
        )
    return forward
