"""Training fast path of the gated layer: both banks, both BatchNorms and the mix in one autograd function.

The reference forward (two module calls, two BatchNorms, an elementwise mix, each saving its own tensors) costs
about twice plain fine-tuning. Here one kernel runs over the concatenated banks where that is faster (dense layers
with large activations), the pre-trained bank never gets a weight gradient, backward keeps only the banks' centred
pre-norm outputs, and the BatchNorm and gate gradients come from per-(example, channel) sums instead of extra
full-size tensors.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .bank_ops import BankOp, BankShape, accumulation_dtype, joins_well, run_banks
from .batchnorm_ops import (
    _BatchNorm,
    batchnorm_running_stats,
    batchnorm_step,
    batchnorms_compatible,
    uses_batch_statistics,
)


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
    # pre-trained bank wants one too, rather than of the concatenated weight, half of which would be discarded.
    join: bool


class FusedGatedBanks(torch.autograd.Function):
    """`gates * finetuned(x) + (1 - gates) * pretrained(x)` with each bank's BatchNorm, as one function with a
    hand-written backward.

    Against the reference (two module calls, two BatchNorms, a mix, each saving its own tensors) it keeps only the
    banks' centred pre-norm outputs and per-channel statistics for backward, normalises and mixes in three
    elementwise passes without materialising the normalised banks, derives the gate and BatchNorm gradients from
    three per-(example, channel) reductions, and never computes the pre-trained bank's weight gradient. Running
    statistics are updated by the same ATen kernel (`batch_norm_update_stats`) that `native_batch_norm` uses, so
    they match the reference bit for bit.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gates: torch.Tensor,
        weight_finetuned: torch.Tensor,
        weight_pretrained: torch.Tensor,
        bias_finetuned: torch.Tensor | None,
        bias_pretrained: torch.Tensor | None,
        gamma_finetuned: torch.Tensor | None,
        beta_finetuned: torch.Tensor | None,
        gamma_pretrained: torch.Tensor | None,
        beta_pretrained: torch.Tensor | None,
        running_finetuned: tuple[torch.Tensor | None, torch.Tensor | None],
        running_pretrained: tuple[torch.Tensor | None, torch.Tensor | None],
        spec: FusedSpec,
    ) -> torch.Tensor:
        (out_finetuned, out_pretrained), joined, joined_weight = run_banks(
            spec.op,
            hidden_states,
            (weight_finetuned, weight_pretrained),
            (bias_finetuned, bias_pretrained),
            spec.join,
        )
        ctx.joined_weight = joined_weight  # not an input: plain attribute, freed with ctx
        shape = BankShape(spec.op.linear, out_finetuned.ndim)
        ctx.spec, ctx.shape, ctx.joined_shape = spec, shape, None if joined is None else joined.shape
        ctx.has_bias = bias_finetuned is not None
        if spec.norm is None:
            mixed = torch.lerp(out_pretrained, out_finetuned, shape.per_example(gates))
            # Without a norm the backward needs the banks' outputs only for the gate gradient, and only their
            # difference.
            difference = out_finetuned - out_pretrained if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(hidden_states, gates, weight_finetuned, weight_pretrained, difference)
            return mixed
        norm = spec.norm
        mean_finetuned, invstd_finetuned = _bank_statistics(out_finetuned, running_finetuned, norm)
        mean_pretrained, invstd_pretrained = _bank_statistics(out_pretrained, running_pretrained, norm)
        # Centre in place (the conv outputs are this function's own): the backward reductions then see (y - mean)
        # like native BatchNorm's, without cancellation when the mean dwarfs the spread.
        out_finetuned.sub_(shape.per_channel(mean_finetuned.to(out_finetuned.dtype)))
        out_pretrained.sub_(shape.per_channel(mean_pretrained.to(out_pretrained.dtype)))
        scale_finetuned, scale_pretrained = (
            _times(gamma_finetuned, invstd_finetuned),
            _times(gamma_pretrained, invstd_pretrained),
        )
        coefficient_finetuned = gates * scale_finetuned
        coefficient_pretrained = (1 - gates) * scale_pretrained
        dtype = out_finetuned.dtype
        # Binary ops and addcmul_ with one broadcast operand: these stay vectorised (addcmul with two broadcast
        # operands does not, and runs 1.5-2x slower on CPU).
        mixed = torch.mul(out_finetuned, shape.per_example(coefficient_finetuned.to(dtype)))
        mixed.addcmul_(shape.per_example(coefficient_pretrained.to(dtype)), out_pretrained)
        if beta_finetuned is not None:
            mixed.add_(shape.per_example((gates * beta_finetuned + (1 - gates) * beta_pretrained).to(dtype)))
        ctx.save_for_backward(hidden_states, gates, weight_finetuned, weight_pretrained, out_finetuned,
                              out_pretrained, invstd_finetuned, invstd_pretrained, gamma_finetuned,
                              beta_finetuned, gamma_pretrained, beta_pretrained)  # fmt: skip
        return mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mixed: torch.Tensor):
        spec: FusedSpec = ctx.spec
        # Read once: under activation checkpointing each saved tensor may be unpacked only once.
        saved = ctx.saved_tensors
        if spec.norm is None:
            grads = _mix_backward(ctx, saved, grad_mixed)
        else:
            grads = _normalized_mix_backward(ctx, saved, grad_mixed)
        (joined, grad_bank_finetuned, grad_bank_pretrained), grad_gates, norm_grads = grads
        hidden_states, _, weight_finetuned, weight_pretrained = saved[:4]
        grad_input, grad_weights, grad_biases = _banks_backward(
            ctx,
            joined,
            grad_bank_finetuned,
            grad_bank_pretrained,
            hidden_states,
            weight_finetuned,
            weight_pretrained,
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


def _mix_backward(ctx, saved: tuple[torch.Tensor, ...], grad_mixed: torch.Tensor):
    gates, difference = saved[1], saved[4]
    shape: BankShape = ctx.shape
    buffers = joined, grad_finetuned, grad_pretrained = _bank_gradient_buffers(ctx, grad_mixed)
    grad_gates = None
    if ctx.needs_input_grad[1]:
        # The gradient buffer doubles as scratch space: no extra full-size allocation.
        grad_gates = shape.spatial_sum(torch.mul(grad_mixed, difference, out=grad_finetuned)).to(gates.dtype)
    weight = shape.per_example(gates.to(grad_mixed.dtype))
    torch.mul(grad_mixed, weight, out=grad_finetuned)
    torch.mul(grad_mixed, 1 - weight, out=grad_pretrained)
    return buffers, grad_gates, (None, None, None, None)


def _normalized_mix_backward(ctx, saved: tuple[torch.Tensor, ...], grad_mixed: torch.Tensor):
    """Backward of the normalised mix. With per-(example, channel) sums A = sum(dy), P_b = sum(dy * (y_b - mean_b))
    every gradient is closed-form: the gate's is sum(dy * (z_F - z_S)), each BatchNorm's the standard batch-norm
    backward of the bank's share (gate-weighted) of dy."""
    gates, centred_finetuned, centred_pretrained = saved[1], *saved[4:6]
    (
        invstd_finetuned,
        invstd_pretrained,
        gamma_finetuned,
        beta_finetuned,
        gamma_pretrained,
        beta_pretrained,
    ) = saved[6:]
    spec: FusedSpec = ctx.spec
    shape: BankShape = ctx.shape
    needs = ctx.needs_input_grad
    buffers = _bank_gradient_buffers(ctx, grad_mixed)
    total = shape.spatial_sum(grad_mixed)
    # sum(dy * xhat_b), with the gradient buffers as scratch space for the products.
    projected_finetuned = (
        shape.spatial_sum(torch.mul(grad_mixed, centred_finetuned, out=buffers[1])) * invstd_finetuned
    )
    projected_pretrained = (
        shape.spatial_sum(torch.mul(grad_mixed, centred_pretrained, out=buffers[2])) * invstd_pretrained
    )
    share_finetuned = gates.to(accumulation_dtype(gates.dtype))
    share_pretrained = 1 - share_finetuned
    grad_gates = None
    if needs[1]:
        grad_gates = _times(gamma_finetuned, projected_finetuned) - _times(
            gamma_pretrained, projected_pretrained
        )
        if beta_finetuned is not None:
            grad_gates = grad_gates + (beta_finetuned - beta_pretrained) * total
        grad_gates = grad_gates.to(gates.dtype)
    grad_beta_finetuned, grad_beta_pretrained = (
        (share_finetuned * total).sum(0),
        (share_pretrained * total).sum(0),
    )
    grad_gamma_finetuned, grad_gamma_pretrained = (
        (share_finetuned * projected_finetuned).sum(0),
        (share_pretrained * projected_pretrained).sum(0),
    )
    count = grad_mixed.numel() // grad_mixed.shape[shape.channel_dim]
    for grad, centred, share, invstd, gamma, grad_gamma, grad_beta in (
        (
            buffers[1],
            centred_finetuned,
            share_finetuned,
            invstd_finetuned,
            gamma_finetuned,
            grad_gamma_finetuned,
            grad_beta_finetuned,
        ),
        (
            buffers[2],
            centred_pretrained,
            share_pretrained,
            invstd_pretrained,
            gamma_pretrained,
            grad_gamma_pretrained,
            grad_beta_pretrained,
        ),
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
    affine = gamma_finetuned is not None
    norm_grads = (
        grad_gamma_finetuned if affine and needs[6] else None,
        grad_beta_finetuned if affine and needs[7] else None,
        grad_gamma_pretrained if affine and needs[8] else None,
        grad_beta_pretrained if affine and needs[9] else None,
    )
    return (
        buffers,
        grad_gates,
        tuple(
            g.to(p.dtype) if g is not None else None
            for g, p in zip(
                norm_grads, (gamma_finetuned, beta_finetuned, gamma_pretrained, beta_pretrained), strict=True
            )
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
    grad_finetuned: torch.Tensor,
    grad_pretrained: torch.Tensor,
    hidden_states: torch.Tensor,
    weight_finetuned: torch.Tensor,
    weight_pretrained: torch.Tensor,
) -> tuple[torch.Tensor | None, tuple, tuple]:
    """Input gradient through both banks; weight (and bias) gradients only for banks that require them."""
    spec: FusedSpec = ctx.spec
    op, has_bias, needs = spec.op, ctx.has_bias, ctx.needs_input_grad
    want_finetuned, want_pretrained = needs[2] or needs[4], needs[3] or needs[5]
    if joined is None:
        banks = (
            (grad_finetuned, weight_finetuned, want_finetuned),
            (grad_pretrained, weight_pretrained, want_pretrained),
        )
        (grad_input, *finetuned), (grad_input_pretrained, *pretrained) = (
            op.backward(grad, hidden_states, weight, has_bias, (needs[0], want, want))
            for grad, weight, want in banks
        )
        if grad_input is not None:
            grad_input = grad_input.add_(grad_input_pretrained)
        return grad_input, (finetuned[0], pretrained[0]), (finetuned[1], pretrained[1])
    weight = ctx.joined_weight
    if want_pretrained:
        grad_input, grad_weight, grad_bias = op.backward(
            joined, hidden_states, weight, has_bias, (needs[0], want_finetuned or want_pretrained, True)
        )
        channels = weight_finetuned.shape[0]
        grad_weights = grad_weight.split(channels) if grad_weight is not None else (None, None)
        grad_biases = grad_bias.split(channels) if grad_bias is not None else (None, None)
        return grad_input, tuple(grad_weights), tuple(grad_biases)
    grad_input = op.backward(joined, hidden_states, weight, False, (needs[0], False, False))[0]
    if not want_finetuned:
        return grad_input, (None, None), (None, None)
    _, grad_weight_finetuned, grad_bias_finetuned = op.backward(
        grad_finetuned.contiguous(), hidden_states, weight_finetuned, has_bias, (False, True, True)
    )
    return grad_input, (grad_weight_finetuned, None), (grad_bias_finetuned, None)


def fused_layer_forward(
    op: BankOp,
    finetuned_layer: nn.Module,
    base_layer: nn.Module,
    finetuned_norm: _BatchNorm | None,
    base_norm: _BatchNorm | None,
    hidden_states: torch.Tensor,
    gates: torch.Tensor,
) -> torch.Tensor | None:
    """A gated layer's forward with autograd through `FusedGatedBanks`: what autocast would do to each bank's conv,
    each norm's branch and step, then the one function; None where it could not match the reference exactly
    (norms with other settings, a bias in one bank only)."""
    if finetuned_norm is not None and not batchnorms_compatible(finetuned_norm, base_norm):
        return None
    if (finetuned_layer.bias is None) != (base_layer.bias is None):
        return None
    hidden_states = op.prepare(base_layer, hidden_states)
    weights = op.weight(finetuned_layer), op.weight(base_layer)
    biases = finetuned_layer.bias, base_layer.bias
    device_type = hidden_states.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # What autocast does to each bank's conv: inputs, weights and biases in the lower precision.
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states = hidden_states.to(dtype)
        weights = tuple(w.to(dtype) for w in weights)
        biases = tuple(b.to(dtype) if b is not None else None for b in biases)
    norm_spec, norm_params, running = None, (None,) * 4, ((None, None), (None, None))
    if finetuned_norm is not None:
        norm_spec = NormSpec(uses_batch_statistics(base_norm), batchnorm_step(base_norm), base_norm.eps)
        batchnorm_step(finetuned_norm)
        norm_params = finetuned_norm.weight, finetuned_norm.bias, base_norm.weight, base_norm.bias
        running = batchnorm_running_stats(finetuned_norm), batchnorm_running_stats(base_norm)
    spec = FusedSpec(op, norm_spec, join=joins_well(op, hidden_states, weights[0]))
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        mixed = FusedGatedBanks.apply(
            hidden_states, gates.to(weights[1].dtype), *weights, *biases, *norm_params, *running, spec
        )
    if base_norm is not None and finetuned_norm is None:
        mixed = base_norm(mixed)
    return mixed
