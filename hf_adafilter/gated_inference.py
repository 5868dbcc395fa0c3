"""Inference fast paths of the gated layer: each BatchNorm folded into its bank, then per example either one merged
kernel (`S' + g * (F' - S')`, one convolution per layer like the plain backbone) or both banks and a select, as a
cost model decides.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bank_ops import BankOp, BankShape
from .batchnorm_ops import _BatchNorm, fold_batchnorm


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
