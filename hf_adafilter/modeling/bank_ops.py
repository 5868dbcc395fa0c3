"""One filter bank as a functional op (conv or linear with every padding explicit), the gate network's pooled input,
and both banks' outputs computed together: the building blocks of the gated layer's fast paths.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BankOp:
    """A bank's module as plain `F.conv2d` / `F.linear` arguments, with every padding made explicit.

    `convolution_backward` takes integer padding only, so string ("same") and non-zero padding modes become an
    explicit `F.pad` of the input, exactly what `nn.Conv2d` does internally.
    """

    linear: bool
    groups: int = 1
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    input_pad: tuple[int, ...] | None = None
    input_pad_mode: str = "constant"
    standardize_eps: float | None = None

    def prepare(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """The input as the bank's kernel sees it (padded); both banks share it."""
        if self.standardize_eps is not None and module.pad is not None:
            hidden_states = module.pad(hidden_states)
        if self.input_pad is not None:
            hidden_states = F.pad(hidden_states, self.input_pad, mode=self.input_pad_mode)
        return hidden_states

    def output_positions(self, hidden_states: torch.Tensor, kernel_size: Sequence[int]) -> int:
        """Output positions per example and channel, for an input already through `prepare`."""
        if self.linear:
            return hidden_states[0].numel() // hidden_states.shape[-1]
        positions = 1
        for size, kernel, stride, padding, dilation in zip(
            hidden_states.shape[2:], kernel_size, self.stride, self.padding, self.dilation, strict=True
        ):
            positions *= (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        return positions

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the module's forward actually uses (standardised for weight-standardised convs)."""
        weight = module.weight
        if self.standardize_eps is None:
            return weight
        flat = weight.reshape(1, weight.shape[0], -1)
        return F.batch_norm(
            flat, None, None, training=True, momentum=0.0, eps=self.standardize_eps
        ).reshape_as(weight)

    def __call__(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.linear:
            return F.linear(hidden_states, weight, bias)
        return F.conv2d(hidden_states, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self,
        grad_output: torch.Tensor,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        has_bias: bool,
        mask: Sequence[bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of input, weight and bias, computing only those `mask` asks for."""
        if self.linear:
            grad_input = grad_output.matmul(weight) if mask[0] else None
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            grad_weight = (
                flat_grad.t().mm(hidden_states.reshape(-1, hidden_states.shape[-1])) if mask[1] else None
            )
            grad_bias = flat_grad.sum(0) if mask[2] and has_bias else None
            return grad_input, grad_weight, grad_bias
        if mask[1] and depthwise_weight_grad_is_faster(weight, self.groups):
            grad_input = self.backward(grad_output, hidden_states, weight, False, (mask[0], False, False))[0]
            grad_weight = depthwise_weight_grad(grad_output, hidden_states, weight.shape, self)
            grad_bias = grad_output.sum((0, 2, 3)) if mask[2] and has_bias else None
            return grad_input, grad_weight, grad_bias
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            hidden_states,
            weight,
            [weight.shape[0]] if has_bias else None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * len(self.stride),
            self.groups,
            [mask[0], mask[1], mask[2] and has_bias],
        )
        return tuple(grad if wanted else None for grad, wanted in zip(grads, mask, strict=True))


def depthwise_weight_grad_is_faster(weight: torch.Tensor, groups: int) -> bool:
    """oneDNN's CPU weight gradient of a depthwise conv is fast for 3x3 kernels but 10-20x slower than
    `depthwise_weight_grad` for 5x5 and larger (measured on Lite0 and ConvNeXt shapes, see speed.md)."""
    return (
        weight.device.type == "cpu"
        and weight.shape[1] == 1
        and groups == weight.shape[0]
        and weight.shape[2] * weight.shape[3] > 9
    )


def depthwise_weight_grad(
    grad_output: torch.Tensor, hidden_states: torch.Tensor, weight_shape: torch.Size, op: BankOp
) -> torch.Tensor:
    """Weight gradient of a depthwise conv as a forward conv: each (channel, example) input plane correlated with
    its output-gradient plane as the kernel (the conv's stride becomes the dilation), then summed over examples."""
    batch, channels = hidden_states.shape[:2]
    planes = hidden_states.transpose(0, 1).reshape(1, channels * batch, *hidden_states.shape[2:])
    kernels = grad_output.transpose(0, 1).reshape(channels * batch, 1, *grad_output.shape[2:])
    correlation = F.conv2d(planes, kernels, None, op.dilation, op.padding, op.stride, channels * batch)
    height, width = weight_shape[2:]
    return correlation.view(channels, batch, *correlation.shape[2:])[..., :height, :width].sum(1).unsqueeze(1)


def _explicit_conv_padding(conv: nn.Conv2d) -> tuple[tuple[int, ...], tuple[int, ...] | None, str]:
    """(kernel padding, input pad for F.pad or None, pad mode) equivalent to the conv's own padding handling."""
    if conv.padding_mode != "zeros":
        return (0, 0), tuple(conv._reversed_padding_repeated_twice), conv.padding_mode
    if conv.padding == "valid":
        return (0, 0), None, "constant"
    if conv.padding != "same":
        return tuple(conv.padding), None, "constant"
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if all(total % 2 == 0 for total in totals):
        return tuple(total // 2 for total in totals), None, "constant"
    # Odd total padding: like aten's "same", the extra row/column goes to the bottom/right.
    input_pad: list[int] = []
    for total in reversed(totals):
        input_pad += [total // 2, total - total // 2]
    return (0, 0), tuple(input_pad), "constant"


def bank_op(module: nn.Module, standardize_eps: float | None = None) -> BankOp | None:
    """The functional form of a bank, or None where its forward is something the fast paths do not replicate.
    `standardize_eps`: the module is its family's weight-standardised conv, with this epsilon."""
    if isinstance(module, nn.Linear):
        return BankOp(linear=True) if type(module).forward is nn.Linear.forward else None
    if not isinstance(module, nn.Conv2d) or len(module.kernel_size) != 2:
        return None
    plain = (
        type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    )
    if not (standardize_eps is not None or plain):
        return None
    padding, input_pad, mode = _explicit_conv_padding(module)
    return BankOp(
        linear=False,
        groups=module.groups,
        stride=tuple(module.stride),
        padding=padding,
        dilation=tuple(module.dilation),
        input_pad=input_pad,
        input_pad_mode=mode,
        standardize_eps=standardize_eps,
    )


class SpatialMean(torch.autograd.Function):
    """`x.mean(dims)` whose backward hands autograd a broadcast view of `grad / count`.

    `mean`'s own backward materialises the full-size `grad / count`, which autograd then adds to the input's other
    gradient: one extra write and read of every gated layer's input, the largest tensors of a training step.
    """

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.shape, ctx.dims = hidden_states.shape, dims
        return hidden_states.mean(dims)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        count = 1
        for dim in ctx.dims:
            count *= ctx.shape[dim]
        grad = grad / count
        for dim in sorted(ctx.dims):
            grad = grad.unsqueeze(dim)
        return grad.expand(ctx.shape), None


@dataclass(frozen=True)
class BankShape:
    """Broadcasts per-example (N, C) and per-channel (C,) values against a bank output: (N, C, H, W) for convs,
    (N, ..., C) for Linear (channels last)."""

    linear: bool
    ndim: int

    @property
    def channel_dim(self) -> int:
        return -1 if self.linear else 1

    def per_example(self, values: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return values.view(values.shape[0], *([1] * (self.ndim - 2)), values.shape[1])
        return values.view(*values.shape, *([1] * (self.ndim - 2)))

    def per_channel(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.linear else values.view(-1, *([1] * (self.ndim - 2)))

    def spatial_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over every position of each example and channel, at least in fp32: (N, C)."""
        dtype = accumulation_dtype(values.dtype)
        dims = tuple(range(1, self.ndim - 1)) if self.linear else tuple(range(2, self.ndim))
        return values.sum(dims, dtype=dtype) if dims else values.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (as BatchNorm accumulates), the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def run_banks(
    op: BankOp,
    hidden_states: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None],
    join: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """(fine-tuned, pre-trained) outputs, plus, with `join`, the one output over the concatenated banks whose
    channel slices they are, and the concatenated weight. Grouped convs never join: concatenating their banks turns a
    depthwise conv into a depth-multiplier-2 conv, which oneDNN runs 10-30x slower on CPU."""
    if not join:
        return (
            (op(hidden_states, weights[0], biases[0]), op(hidden_states, weights[1], biases[1])),
            None,
            None,
        )
    bias = torch.cat(biases) if biases[0] is not None else None
    joined_weight = torch.cat(weights)
    joined = op(hidden_states, joined_weight, bias)
    channels = weights[0].shape[0]
    dim = -1 if op.linear else 1
    return (joined.narrow(dim, 0, channels), joined.narrow(dim, channels, channels)), joined, joined_weight


def joins_well(op: BankOp, hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether training should run both banks as one kernel over concatenated weights.

    Joining reads the input once and runs one larger GEMM, but copies both banks' weights into one tensor every
    step; per-layer measurements (Lite0, ResNet-50 shapes, CPU) favour it while the input is at least as large as
    one bank's weight, and it never pays for grouped convs (see `run_banks`). Off CPU (unmeasured) every ungrouped
    layer joins: one larger GEMM saves a kernel launch and a read of the input, and copying the weights costs little
    at GPU memory bandwidth.
    """
    if op.groups != 1:
        return False
    return weight.device.type != "cpu" or hidden_states.numel() >= weight.numel()
