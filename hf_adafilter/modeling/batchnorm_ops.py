"""BatchNorm bookkeeping the fast paths share with `nn.BatchNorm2d`: which norms they can replicate, the running
statistics update, and folding a norm into its bank.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


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
    """Weight and bias of `norm(conv(x))` as one conv (norm in eval mode: running statistics). The arithmetic of
    `torch.nn.utils.fusion.fuse_conv_bn_weights`, which cannot serve here: it returns new `nn.Parameter`s, which
    `torch.compile` cannot create inside a traced forward (a graph break on every gated layer)."""
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
