"""Fast paths of the gated layer: one fused autograd function for training, folded and merged banks for inference.

The reference forward (two module calls, two BatchNorms, an elementwise mix, each saving its own tensors) costs
about twice plain fine-tuning. Training here runs both banks, both BatchNorms and the mix in one autograd function:
one kernel over the concatenated banks where that is faster (dense layers with large activations), the frozen bank
never gets a weight gradient, backward keeps only the banks' centred pre-norm outputs, and the BatchNorm and gate
gradients come from per-(example, channel) sums instead of extra full-size tensors. Inference folds each
BatchNorm into its bank and, per example, picks each filter's bank inside one merged kernel (`S' + g * (F' - S')`),
so a gated layer costs one convolution like the plain backbone; a cost model falls back to both banks plus a select
where merging would cost more.

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # BiT's weight-standardised conv: its forward is not plain F.conv2d, so the fast paths replicate it.
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d
except ImportError:  # pragma: no cover - a transformers without BiT only loses the fast path for it
    WeightStandardizedConv2d = None

_BatchNorm = nn.modules.batchnorm._BatchNorm


# ----------------------------------------------------------------------------- one bank as a functional op


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
        """The weight the module's forward actually uses (standardised for BiT)."""
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


def bank_op(module: nn.Module) -> BankOp | None:
    """The functional form of a bank, or None where its forward is something the fast paths do not replicate."""
    if isinstance(module, nn.Linear):
        return BankOp(linear=True) if type(module).forward is nn.Linear.forward else None
    if not isinstance(module, nn.Conv2d) or len(module.kernel_size) != 2:
        return None
    standardized = WeightStandardizedConv2d is not None and type(module) is WeightStandardizedConv2d
    plain = (
        type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
    )
    if not (standardized or plain):
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
        standardize_eps=float(module.eps) if standardized else None,
    )


# ----------------------------------------------------------------------------- the gate network's input


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


# ----------------------------------------------------------------------------- both banks' outputs


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
    one bank's weight, and it never pays for grouped convs (see `run_banks`).
    """
    return op.groups == 1 and hidden_states.numel() >= weight.numel()


# ----------------------------------------------------------------------------- BatchNorm bookkeeping


def is_plain_batchnorm(norm: nn.Module | None) -> bool:
    return isinstance(norm, nn.BatchNorm2d) and type(norm).forward is _BatchNorm.forward


def uses_batch_statistics(norm: _BatchNorm) -> bool:
    """Whether the norm normalises with batch statistics, as `_BatchNorm.forward` decides it."""
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def batchnorms_compatible(first: _BatchNorm, second: _BatchNorm) -> bool:
    """Whether both banks' norms take the same branch of `_BatchNorm.forward` with the same eps and averaging
    factor, so the fused function can treat them alike."""
    return (
        first.eps == second.eps
        and first.momentum == second.momentum
        and first.affine == second.affine
        and first.track_running_stats == second.track_running_stats
        and first.training == second.training
        and (first.running_mean is None) == (second.running_mean is None)
        and (
            first.momentum is not None
            or not (first.training and first.track_running_stats)
            or torch.equal(first.num_batches_tracked, second.num_batches_tracked)
        )
    )


def batchnorm_step(norm: _BatchNorm) -> float:
    """Advances `num_batches_tracked` exactly as `_BatchNorm.forward` does and returns the averaging factor."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return factor


def batchnorm_running_stats(norm: _BatchNorm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The running statistics `_BatchNorm.forward` passes on: none when training without tracking them."""
    if not norm.training or norm.track_running_stats:
        return norm.running_mean, norm.running_var
    return None, None


def fold_batchnorm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: _BatchNorm | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of `norm(conv(x))` as one conv (norm in eval mode: running statistics)."""
    if norm is None:
        return weight, bias
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), shift


# ----------------------------------------------------------------------------- training: both banks in one function


@dataclass(frozen=True)
class NormSpec:
    """The branch of `_BatchNorm.forward` both banks' norms take."""

    batch_statistics: bool
    momentum: float
    eps: float


@dataclass(frozen=True)
class FusedSpec:
    op: BankOp
    norm: NormSpec | None
    # One kernel over concatenated banks (groups == 1) rather than one per bank. Backward then still takes the
    # weight gradient of the fine-tuned bank alone (from a contiguous copy of its output gradient) unless the
    # frozen bank wants one too, rather than of the concatenated weight, half of which would be discarded.
    join: bool


class FusedGatedBanks(torch.autograd.Function):
    """`gates * F'(x) + (1 - gates) * S'(x)` with each bank's BatchNorm, as one function with a hand-written backward.

    Against the reference (two module calls, two BatchNorms, a mix, each saving its own tensors) it keeps only the
    banks' centred pre-norm outputs and per-channel statistics for backward, normalises and mixes in three
    elementwise passes without materialising the normalised banks, derives the gate and BatchNorm gradients from
    three per-(example, channel) reductions, and never computes the frozen bank's weight gradient. Running statistics are updated by the same ATen kernel
    (`batch_norm_update_stats`) that `native_batch_norm` uses, so they match the reference bit for bit.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gates: torch.Tensor,
        weight_f: torch.Tensor,
        weight_s: torch.Tensor,
        bias_f: torch.Tensor | None,
        bias_s: torch.Tensor | None,
        gamma_f: torch.Tensor | None,
        beta_f: torch.Tensor | None,
        gamma_s: torch.Tensor | None,
        beta_s: torch.Tensor | None,
        running_f: tuple[torch.Tensor | None, torch.Tensor | None],
        running_s: tuple[torch.Tensor | None, torch.Tensor | None],
        spec: FusedSpec,
    ) -> torch.Tensor:
        (out_f, out_s), joined, joined_weight = run_banks(
            spec.op, hidden_states, (weight_f, weight_s), (bias_f, bias_s), spec.join
        )
        ctx.joined_weight = joined_weight  # not an input: plain attribute, freed with ctx
        shape = BankShape(spec.op.linear, out_f.ndim)
        ctx.spec, ctx.shape, ctx.joined_shape = spec, shape, None if joined is None else joined.shape
        ctx.has_bias = bias_f is not None
        if spec.norm is None:
            mixed = torch.lerp(out_s, out_f, shape.per_example(gates))
            # Without a norm the backward needs the banks' outputs only for the gate gradient, and only their
            # difference.
            difference = out_f - out_s if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(hidden_states, gates, weight_f, weight_s, difference)
            return mixed
        norm = spec.norm
        mean_f, invstd_f = _bank_statistics(out_f, running_f, norm)
        mean_s, invstd_s = _bank_statistics(out_s, running_s, norm)
        # Centre in place (the conv outputs are this function's own): the backward reductions then see (y - mean)
        # like native BatchNorm's, without cancellation when the mean dwarfs the spread.
        out_f.sub_(shape.per_channel(mean_f.to(out_f.dtype)))
        out_s.sub_(shape.per_channel(mean_s.to(out_s.dtype)))
        scale_f, scale_s = _times(gamma_f, invstd_f), _times(gamma_s, invstd_s)
        coefficient_f = gates * scale_f
        coefficient_s = (1 - gates) * scale_s
        dtype = out_f.dtype
        # Binary ops and addcmul_ with one broadcast operand: these stay vectorised (addcmul with two broadcast
        # operands does not, and runs 1.5-2x slower on CPU).
        mixed = torch.mul(out_f, shape.per_example(coefficient_f.to(dtype)))
        mixed.addcmul_(shape.per_example(coefficient_s.to(dtype)), out_s)
        if beta_f is not None:
            mixed.add_(shape.per_example((gates * beta_f + (1 - gates) * beta_s).to(dtype)))
        ctx.save_for_backward(
            hidden_states,
            gates,
            weight_f,
            weight_s,
            out_f,
            out_s,
            invstd_f,
            invstd_s,
            gamma_f,
            beta_f,
            gamma_s,
            beta_s,
        )
        return mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mixed: torch.Tensor):
        spec: FusedSpec = ctx.spec
        if spec.norm is None:
            grads = _mix_backward(ctx, grad_mixed)
        else:
            grads = _normalized_mix_backward(ctx, grad_mixed)
        (joined, grad_bank_f, grad_bank_s), grad_gates, norm_grads = grads
        hidden_states, _, weight_f, weight_s = ctx.saved_tensors[:4]
        grad_input, grad_weights, grad_biases = _banks_backward(
            ctx, joined, grad_bank_f, grad_bank_s, hidden_states, weight_f, weight_s
        )
        return (
            grad_input,
            grad_gates,
            *grad_weights,
            *grad_biases,
            *norm_grads,
            None,
            None,
            None,
        )


def _times(gamma: torch.Tensor | None, invstd: torch.Tensor) -> torch.Tensor:
    return invstd if gamma is None else invstd * gamma


def _bank_statistics(
    output: torch.Tensor, running: tuple[torch.Tensor | None, torch.Tensor | None], norm: NormSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) the bank's BatchNorm normalises with; in training also updates its running statistics."""
    running_mean, running_var = running
    if norm.batch_statistics:
        mean, var = torch.batch_norm_update_stats(output, running_mean, running_var, norm.momentum)
    else:
        mean, var = running_mean, running_var
    return mean, torch.rsqrt(var + norm.eps)


def _bank_gradient_buffers(ctx, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Where each bank's output gradient goes: halves of one tensor for a joined kernel, else two tensors."""
    if ctx.joined_shape is None:
        return None, torch.empty_like(like), torch.empty_like(like)
    joined = like.new_empty(ctx.joined_shape)
    channels = like.shape[ctx.shape.channel_dim]
    dim = ctx.shape.channel_dim
    return joined, joined.narrow(dim, 0, channels), joined.narrow(dim, channels, channels)


def _mix_backward(ctx, grad_mixed: torch.Tensor):
    gates, difference = ctx.saved_tensors[1], ctx.saved_tensors[4]
    shape: BankShape = ctx.shape
    buffers = joined, grad_f, grad_s = _bank_gradient_buffers(ctx, grad_mixed)
    grad_gates = None
    if ctx.needs_input_grad[1]:
        # The gradient buffer doubles as scratch space: no extra full-size allocation.
        grad_gates = shape.spatial_sum(torch.mul(grad_mixed, difference, out=grad_f)).to(gates.dtype)
    weight = shape.per_example(gates.to(grad_mixed.dtype))
    torch.mul(grad_mixed, weight, out=grad_f)
    torch.mul(grad_mixed, 1 - weight, out=grad_s)
    return buffers, grad_gates, (None, None, None, None)


def _normalized_mix_backward(ctx, grad_mixed: torch.Tensor):
    """Backward of the normalised mix. With per-(example, channel) sums A = sum(dy), P_b = sum(dy * (y_b - mean_b))
    every gradient is closed-form: the gate's is sum(dy * (z_F - z_S)), each BatchNorm's the standard batch-norm
    backward of the bank's share (gate-weighted) of dy."""
    gates, centred_f, centred_s = ctx.saved_tensors[1], *ctx.saved_tensors[4:6]
    invstd_f, invstd_s, gamma_f, beta_f, gamma_s, beta_s = ctx.saved_tensors[6:]
    spec: FusedSpec = ctx.spec
    shape: BankShape = ctx.shape
    needs = ctx.needs_input_grad
    buffers = _bank_gradient_buffers(ctx, grad_mixed)
    total = shape.spatial_sum(grad_mixed)
    # sum(dy * xhat_b), with the gradient buffers as scratch space for the products.
    projected_f = shape.spatial_sum(torch.mul(grad_mixed, centred_f, out=buffers[1])) * invstd_f
    projected_s = shape.spatial_sum(torch.mul(grad_mixed, centred_s, out=buffers[2])) * invstd_s
    share_f = gates.to(accumulation_dtype(gates.dtype))
    share_s = 1 - share_f
    grad_gates = None
    if needs[1]:
        grad_gates = _times(gamma_f, projected_f) - _times(gamma_s, projected_s)
        if beta_f is not None:
            grad_gates = grad_gates + (beta_f - beta_s) * total
        grad_gates = grad_gates.to(gates.dtype)
    grad_beta_f, grad_beta_s = (share_f * total).sum(0), (share_s * total).sum(0)
    grad_gamma_f, grad_gamma_s = (share_f * projected_f).sum(0), (share_s * projected_s).sum(0)
    count = grad_mixed.numel() // grad_mixed.shape[shape.channel_dim]
    for grad, centred, share, invstd, gamma, grad_gamma, grad_beta in (
        (buffers[1], centred_f, share_f, invstd_f, gamma_f, grad_gamma_f, grad_beta_f),
        (buffers[2], centred_s, share_s, invstd_s, gamma_s, grad_gamma_s, grad_beta_s),
    ):
        scale = _times(gamma, invstd)
        _batchnorm_input_grad(
            grad,
            grad_mixed,
            centred,
            share * scale,
            scale,
            invstd,
            grad_gamma,
            grad_beta,
            count,
            spec.norm,
            shape,
        )
    affine = gamma_f is not None
    norm_grads = (
        grad_gamma_f if affine and needs[6] else None,
        grad_beta_f if affine and needs[7] else None,
        grad_gamma_s if affine and needs[8] else None,
        grad_beta_s if affine and needs[9] else None,
    )
    return (
        buffers,
        grad_gates,
        tuple(
            g.to(p.dtype) if g is not None else None
            for g, p in zip(norm_grads, (gamma_f, beta_f, gamma_s, beta_s), strict=True)
        ),
    )


def _batchnorm_input_grad(
    out: torch.Tensor,
    grad_mixed: torch.Tensor,
    centred: torch.Tensor,
    coefficient: torch.Tensor,
    scale: torch.Tensor,
    invstd: torch.Tensor,
    grad_gamma: torch.Tensor,
    grad_beta: torch.Tensor,
    count: int,
    norm: NormSpec,
    shape: BankShape,
) -> None:
    """Writes dL/dy_b = coefficient * dy + (batch statistics only) the gradient through the mean and variance:
    - scale * (grad_beta + (y_b - mean_b) * invstd * grad_gamma) / count."""
    dtype = out.dtype
    if not norm.batch_statistics:
        torch.mul(grad_mixed, shape.per_example(coefficient.to(dtype)), out=out)
        return
    through_var = -scale * invstd * grad_gamma / count
    through_mean = -scale * grad_beta / count
    torch.mul(grad_mixed, shape.per_example(coefficient.to(dtype)), out=out)
    out.addcmul_(shape.per_channel(through_var.to(dtype)), centred)
    out.add_(shape.per_channel(through_mean.to(dtype)))


def _banks_backward(
    ctx,
    joined: torch.Tensor | None,
    grad_f: torch.Tensor,
    grad_s: torch.Tensor,
    hidden_states: torch.Tensor,
    weight_f: torch.Tensor,
    weight_s: torch.Tensor,
) -> tuple[torch.Tensor | None, tuple, tuple]:
    """Input gradient through both banks; weight (and bias) gradients only for banks that require them."""
    spec: FusedSpec = ctx.spec
    op, has_bias, needs = spec.op, ctx.has_bias, ctx.needs_input_grad
    want_f, want_s = needs[2] or needs[4], needs[3] or needs[5]
    if joined is None:
        grad_input, grad_weight_f, grad_bias_f = op.backward(
            grad_f, hidden_states, weight_f, has_bias, (needs[0], want_f, want_f)
        )
        grad_input_s, grad_weight_s, grad_bias_s = op.backward(
            grad_s, hidden_states, weight_s, has_bias, (needs[0], want_s, want_s)
        )
        if grad_input is not None:
            grad_input = grad_input.add_(grad_input_s)
        return grad_input, (grad_weight_f, grad_weight_s), (grad_bias_f, grad_bias_s)
    weight = ctx.joined_weight
    if want_s:
        grad_input, grad_weight, grad_bias = op.backward(
            joined, hidden_states, weight, has_bias, (needs[0], want_f or want_s, True)
        )
        channels = weight_f.shape[0]
        grad_weights = grad_weight.split(channels) if grad_weight is not None else (None, None)
        grad_biases = grad_bias.split(channels) if grad_bias is not None else (None, None)
        return grad_input, tuple(grad_weights), tuple(grad_biases)
    grad_input = op.backward(joined, hidden_states, weight, False, (needs[0], False, False))[0]
    if not want_f:
        return grad_input, (None, None), (None, None)
    _, grad_weight_f, grad_bias_f = op.backward(
        grad_f.contiguous(), hidden_states, weight_f, has_bias, (False, True, True)
    )
    return grad_input, (grad_weight_f, None), (grad_bias_f, None)


# ----------------------------------------------------------------------------- inference: folded and merged banks


@dataclass
class FoldedBanks:
    """Both banks with their (eval-mode) BatchNorms folded in, cached between inference calls."""

    key: tuple
    weight_f: torch.Tensor
    weight_s: torch.Tensor
    bias_f: torch.Tensor | None
    bias_s: torch.Tensor | None
    # Both banks in one tensor (groups == 1); weight_f / weight_s are then its halves, not copies.
    joined_weight: torch.Tensor | None = None
    joined_bias: torch.Tensor | None = None


def tensors_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """Identity, storage and in-place version of every tensor: changes whenever a folded copy would go stale."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


@torch.no_grad()
def fold_banks(
    op: BankOp,
    finetuned: nn.Module,
    pretrained: nn.Module,
    finetuned_norm: _BatchNorm | None,
    pretrained_norm: _BatchNorm | None,
    key: tuple = (),
) -> FoldedBanks:
    """Each bank as one kernel with its (eval-mode) BatchNorm folded in.

    Without gated norm both banks get the shared norm: BatchNorm is per-channel affine, so normalising the mixture
    equals mixing the normalised banks.
    """
    weight_f, bias_f = fold_batchnorm(op.weight(finetuned), finetuned.bias, finetuned_norm)
    weight_s, bias_s = fold_batchnorm(op.weight(pretrained), pretrained.bias, pretrained_norm)
    if (bias_f is None) != (bias_s is None):
        bias_f = bias_f if bias_f is not None else torch.zeros_like(bias_s)
        bias_s = bias_s if bias_s is not None else torch.zeros_like(bias_f)
    if op.groups != 1:
        return FoldedBanks(key, weight_f, weight_s, bias_f, bias_s)
    channels = weight_f.shape[0]
    joined_weight = torch.cat((weight_f, weight_s))
    joined_bias = torch.cat((bias_f, bias_s)) if bias_f is not None else None
    weight_f, weight_s = joined_weight.split(channels)
    bias_f, bias_s = joined_bias.split(channels) if joined_bias is not None else (None, None)
    return FoldedBanks(key, weight_f, weight_s, bias_f, bias_s, joined_weight, joined_bias)


def merged_forward(
    op: BankOp, hidden_states: torch.Tensor, gates: torch.Tensor, folded: FoldedBanks
) -> torch.Tensor:
    """One kernel per layer: example n uses `S' + g_n * (F' - S')` per filter (`lerp` returns an endpoint exactly,
    so a 0/1 gate picks F' or S' bit for bit), as a grouped conv over the batch when n > 1."""
    batch = hidden_states.shape[0]
    trailing = [1] * (folded.weight_f.ndim - 1)
    gates = gates.to(folded.weight_f.dtype)
    if batch == 1:
        weight = torch.lerp(folded.weight_s, folded.weight_f, gates.view(-1, *trailing))
        bias = torch.lerp(folded.bias_s, folded.bias_f, gates[0]) if folded.bias_f is not None else None
        return op(hidden_states, weight, bias)
    weight = torch.lerp(folded.weight_s, folded.weight_f, gates.view(*gates.shape, *trailing))
    bias = torch.lerp(folded.bias_s, folded.bias_f, gates) if folded.bias_f is not None else None
    if op.linear:
        flat = hidden_states.reshape(batch, -1, hidden_states.shape[-1])
        if bias is None:
            out = torch.bmm(flat, weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        return out.view(*hidden_states.shape[:-1], out.shape[-1])
    out = F.conv2d(
        hidden_states.reshape(1, -1, *hidden_states.shape[2:]),
        weight.flatten(0, 1),
        bias.flatten() if bias is not None else None,
        op.stride,
        op.padding,
        op.dilation,
        op.groups * batch,
    )
    return out.view(batch, -1, *out.shape[2:])


def two_bank_forward(
    op: BankOp, hidden_states: torch.Tensor, gates: torch.Tensor, folded: FoldedBanks
) -> torch.Tensor:
    """Both folded banks (one kernel when they can be joined), then a per-filter select."""
    if folded.joined_weight is not None:
        joined = op(hidden_states, folded.joined_weight, folded.joined_bias)
        channels = folded.weight_f.shape[0]
        dim = -1 if op.linear else 1
        out_f, out_s = joined.narrow(dim, 0, channels), joined.narrow(dim, channels, channels)
    else:
        out_f = op(hidden_states, folded.weight_f, folded.bias_f)
        out_s = op(hidden_states, folded.weight_s, folded.bias_s)
    shape = BankShape(op.linear, out_f.ndim)
    return torch.lerp(out_s, out_f, shape.per_example(gates.to(out_f.dtype)))


def prefer_merged(op: BankOp, weight: torch.Tensor, output_positions: int, batch: int) -> bool:
    """Whether per-example merged kernels beat both banks plus a select, by a cost model measured on CPU
    (`python benchmarks/speed.py --sweep` prints the measurements).

    Merging costs one weight-sized `lerp` per example; the two-bank path doubles the convolution. Batch 1 always
    merges (in a whole forward, where both banks' weights come from memory either way, merging was as fast or
    faster for every Lite0 and ResNet-50 layer), and so do depthwise kernels, which are tiny. Larger batches run a
    grouped conv over per-example kernels, which pays while each kernel covers enough output positions and the
    merged kernels stay small: with 4x4 maps, or batch x weight above 2M elements, both banks were 2-10x faster.
    Off CPU (unmeasured) only batch 1 and depthwise layers merge.
    """
    if batch == 1 or (weight.shape[1] == 1 and not op.linear and op.groups == weight.shape[0]):
        return True
    if weight.device.type != "cpu":
        return False
    return output_positions >= MERGE_MIN_POSITIONS and batch * weight.numel() <= MERGE_MAX_ELEMENTS


MERGE_MIN_POSITIONS = 32
MERGE_MAX_ELEMENTS = 1 << 21
