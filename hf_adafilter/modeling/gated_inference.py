"""Inference fast paths of the gated layer: each BatchNorm folded into its bank, then per example either one merged
kernel (`pretrained + g * (finetuned - pretrained)`, one convolution per layer like the plain backbone) or both banks
and a select, as a cost model decides.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .bank_ops import BankOp, BankShape
from .batchnorm_ops import _BatchNorm, batchnorm_running_stats, batchnorms_compatible, fold_batchnorm
from .kernel_choice import disagreeing_filters, prefer_merged, prefer_split, updates_incrementally


@dataclass
class FoldedBanks:
    """Both banks with their (eval-mode) BatchNorms folded in, cached between inference calls."""

    key: tuple
    weight_finetuned: torch.Tensor
    weight_pretrained: torch.Tensor
    bias_finetuned: torch.Tensor | None
    bias_pretrained: torch.Tensor | None
    # Both banks in one tensor (groups == 1); weight_finetuned / weight_pretrained are then its halves, not copies.
    joined_weight: torch.Tensor | None = None
    joined_bias: torch.Tensor | None = None
    # `content_digest` of the sources it was folded from (None where the model checks versions only).
    digest: torch.Tensor | None = None
    # Batch 1: the last merged kernel and the gates it holds, updated only where the next image's gates differ.
    last_merged: tuple[torch.Tensor, torch.Tensor] | None = None
    # Created on first use (not under torch.compile, which cannot trace it): one forward at a time updates the kernel.
    lock: threading.Lock | None = field(default=None, repr=False, compare=False)


def tensors_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """Identity, storage and in-place version of every tensor: changes with every edit but those through `.data`."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def content_digest(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per tensor, the wrapping integer sum of its elements' bit patterns: exact integer arithmetic, so a change to
    any one element changes it (float sums could round a small edit away). This sees edits through `.data`, which
    version counters do not, at the cost of reading every tensor once."""
    sums = [
        t.view(_SAME_WIDTH_INT[t.element_size()]).sum(
            dtype=torch.int64 if t.element_size() == 8 else torch.int32
        )
        for t in tensors
        if t.is_floating_point()
    ]
    if len({s.dtype for s in sums}) > 1:
        sums = [s.long() for s in sums]
    return torch.stack(sums) if sums else torch.zeros(0)


@torch.no_grad()
def fold_banks(
    op: BankOp,
    finetuned: nn.Module,
    pretrained: nn.Module,
    finetuned_norm: _BatchNorm | None,
    pretrained_norm: _BatchNorm | None,
    key: tuple = (),
    digest: torch.Tensor | None = None,
) -> FoldedBanks:
    """Each bank as one kernel with its (eval-mode) BatchNorm folded in.

    Without gated norm both banks get the shared norm: BatchNorm is per-channel affine, so normalising the mixture
    equals mixing the normalised banks.
    """
    weight_finetuned, bias_finetuned = fold_batchnorm(op.weight(finetuned), finetuned.bias, finetuned_norm)
    weight_pretrained, bias_pretrained = fold_batchnorm(
        op.weight(pretrained), pretrained.bias, pretrained_norm
    )
    if (bias_finetuned is None) != (bias_pretrained is None):
        bias_finetuned = bias_finetuned if bias_finetuned is not None else torch.zeros_like(bias_pretrained)
        bias_pretrained = bias_pretrained if bias_pretrained is not None else torch.zeros_like(bias_finetuned)
    if op.groups != 1:
        return FoldedBanks(
            key, weight_finetuned, weight_pretrained, bias_finetuned, bias_pretrained, digest=digest
        )
    channels = weight_finetuned.shape[0]
    joined_weight = torch.cat((weight_finetuned, weight_pretrained))
    joined_bias = torch.cat((bias_finetuned, bias_pretrained)) if bias_finetuned is not None else None
    weight_finetuned, weight_pretrained = joined_weight.split(channels)
    bias_finetuned, bias_pretrained = joined_bias.split(channels) if joined_bias is not None else (None, None)
    return FoldedBanks(
        key,
        weight_finetuned,
        weight_pretrained,
        bias_finetuned,
        bias_pretrained,
        joined_weight,
        joined_bias,
        digest=digest,
    )


def merge_filters(pretrained: torch.Tensor, finetuned: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """`pretrained + g * (finetuned - pretrained)` per filter (dim 0 of the banks) for gates of shape (filters,) or
    (batch, filters); `lerp` returns an endpoint exactly, so a 0/1 gate picks one bank's filter bit for bit."""
    return torch.lerp(pretrained, finetuned, gates.view(*gates.shape, *[1] * (pretrained.ndim - 1)))


def merged_forward(
    op: BankOp, hidden_states: torch.Tensor, gates: torch.Tensor, folded: FoldedBanks
) -> torch.Tensor:
    """One kernel per layer: example n uses `merge_filters(pretrained, finetuned, g_n)`, as a grouped conv over the
    batch when n > 1."""
    batch = hidden_states.shape[0]
    gates = gates.to(folded.weight_finetuned.dtype)
    gates = gates[0] if batch == 1 else gates  # one value per filter, or per example and filter
    bias = (
        merge_filters(folded.bias_pretrained, folded.bias_finetuned, gates)
        if folded.bias_finetuned is not None
        else None
    )
    if batch == 1:
        if not updates_incrementally(folded.weight_finetuned) or torch.compiler.is_compiling():
            return op(
                hidden_states, merge_filters(folded.weight_pretrained, folded.weight_finetuned, gates), bias
            )
        with _lock_of(folded):  # the kernel is shared state: one forward at a time updates and reads it
            return op(hidden_states, incremental_merged_kernel(folded, gates), bias)
    weight = merge_filters(folded.weight_pretrained, folded.weight_finetuned, gates)
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


def live_merged_forward(
    op: BankOp,
    hidden_states: torch.Tensor,
    gates: torch.Tensor,
    modules: tuple[nn.Module, nn.Module, _BatchNorm | None, _BatchNorm | None],
) -> torch.Tensor | None:
    """Batch 1 from the banks' own tensors, nothing cached: each filter takes its chosen bank's weight, bias and
    norm statistics (`lerp`, exact for 0/1 gates), then one conv and one eval-mode BatchNorm, the plain layer's own
    two calls. Reading the live tensors sees every edit (through `.data` too) with no check to pay; the price is
    writing one kernel per call, which the cached incremental kernel avoids for large kernels. For 0/1 gates only
    (a norm does not mix linearly); None where the banks' norms are not `batchnorms_compatible` (the folded path
    serves)."""
    finetuned, base, finetuned_norm, base_norm = modules
    if (finetuned.bias is None) != (base.bias is None) or (op.linear and base_norm is not None):
        return None
    if finetuned_norm is not None and not batchnorms_compatible(finetuned_norm, base_norm):
        return None
    gates = gates[0]
    weight = merge_filters(op.weight(base), op.weight(finetuned), gates.to(base.weight.dtype))
    bias = merge_filters(base.bias, finetuned.bias, gates.to(base.bias.dtype)) if base.bias is not None else None
    out = op(hidden_states, weight, bias)
    if base_norm is None:
        return out
    statistics = _eval_norm_tensors(base_norm)
    if finetuned_norm is not None:  # gated norm: each filter's own bank's norm
        pairs = zip(statistics, _eval_norm_tensors(finetuned_norm), strict=True)
        statistics = tuple(s if s is None else merge_filters(s, f, gates.to(s.dtype)) for s, f in pairs)
    return F.batch_norm(out, *statistics, False, 0.0, base_norm.eps)


def _eval_norm_tensors(norm: _BatchNorm) -> tuple[torch.Tensor | None, ...]:
    """(running mean, running variance, weight, bias): what an eval-mode BatchNorm normalises with."""
    return (*batchnorm_running_stats(norm), norm.weight, norm.bias)


_LOCK_CREATION = threading.Lock()


def _lock_of(folded: FoldedBanks) -> threading.Lock:
    if folded.lock is None:
        with _LOCK_CREATION:
            if folded.lock is None:
                folded.lock = threading.Lock()
    return folded.lock


def incremental_merged_kernel(folded: FoldedBanks, gates: torch.Tensor) -> torch.Tensor:
    """The batch-1 merged kernel for `gates` (one value per filter), rebuilt only in the rows whose gate differs from
    the previous call's. Consecutive images mostly make the same decisions (about 95% of filters for a trained Lite0,
    see speed.md), and writing the full kernel, not reading the banks, is what a fresh `lerp` costs. The rows are
    computed by the same `merge_filters`, so the kernel equals a fresh one bit for bit."""
    if folded.last_merged is None:
        kernel = merge_filters(folded.weight_pretrained, folded.weight_finetuned, gates)
        folded.last_merged = kernel, gates.clone()
        return kernel
    kernel, last_gates = folded.last_merged
    changed = (gates != last_gates).nonzero().squeeze(1)
    if changed.numel():
        rows = merge_filters(
            folded.weight_pretrained.index_select(0, changed),
            folded.weight_finetuned.index_select(0, changed),
            gates.index_select(0, changed),
        )
        kernel.index_copy_(0, changed, rows)
        last_gates.copy_(gates)
    return kernel


def two_bank_forward(
    op: BankOp, hidden_states: torch.Tensor, gates: torch.Tensor, folded: FoldedBanks
) -> torch.Tensor:
    """Both folded banks (one kernel when they can be joined), then a per-filter select."""
    if folded.joined_weight is not None:
        joined = op(hidden_states, folded.joined_weight, folded.joined_bias)
        channels = folded.weight_finetuned.shape[0]
        dim = -1 if op.linear else 1
        out_finetuned, out_pretrained = (
            joined.narrow(dim, 0, channels),
            joined.narrow(dim, channels, channels),
        )
    else:
        out_finetuned = op(hidden_states, folded.weight_finetuned, folded.bias_finetuned)
        out_pretrained = op(hidden_states, folded.weight_pretrained, folded.bias_pretrained)
    shape = BankShape(op.linear, out_finetuned.ndim)
    return torch.lerp(out_pretrained, out_finetuned, shape.per_example(gates.to(out_finetuned.dtype)))


def agreement_split_forward(
    op: BankOp,
    hidden_states: torch.Tensor,
    gates: torch.Tensor,
    folded: FoldedBanks,
    disagreeing: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One conv with each filter's bank as the batch's first example chose it, then, for the filters on which the
    examples differ, one conv with the other bank, written into the channels of the examples that chose it. Cost
    ~ (1 + disagreeing share) of the plain layer, plus writing both kernels. None where it does not apply (grouped
    convs, gates between 0 and 1). `disagreeing`: `disagreeing_filters(gates)`, when the caller has it already."""
    if op.groups != 1 or not bool(((gates == 0) | (gates == 1)).all()):
        return None
    on = gates.to(torch.bool)
    differing = (disagreeing if disagreeing is not None else disagreeing_filters(gates)).nonzero().squeeze(1)
    out = op(hidden_states, *_chosen_bank(folded, on[0]))
    if differing.numel():
        rows = FoldedBanks(
            (),
            folded.weight_finetuned.index_select(0, differing),
            folded.weight_pretrained.index_select(0, differing),
            folded.bias_finetuned.index_select(0, differing) if folded.bias_finetuned is not None else None,
            folded.bias_pretrained.index_select(0, differing) if folded.bias_pretrained is not None else None,
        )
        first = on[0].index_select(0, differing)
        other = op(hidden_states, *_chosen_bank(rows, ~first))
        dim = -1 if op.linear else 1
        takes_other = BankShape(op.linear, out.ndim).per_example(on.index_select(1, differing) != first)
        out.index_copy_(dim, differing, torch.where(takes_other, other, out.index_select(dim, differing)))
    return out


def _chosen_bank(folded: FoldedBanks, finetuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) with each filter from the fine-tuned bank where `finetuned` (a (filters,) bool mask) says so,
    else from the pre-trained one."""
    chosen = finetuned.view(-1, *[1] * (folded.weight_finetuned.ndim - 1))
    weight = torch.where(chosen, folded.weight_finetuned, folded.weight_pretrained)
    if folded.bias_finetuned is None:
        return weight, None
    return weight, torch.where(finetuned, folded.bias_finetuned, folded.bias_pretrained)


def folding_sources(modules: Sequence[nn.Module | None]) -> list[torch.Tensor]:
    """Every tensor a folded bank is computed from (read through the modules' dicts: this runs every call). A
    DataParallel replica keeps its parameter copies as plain attributes, outside `_parameters`."""
    return [
        tensor
        for module in modules
        if module is not None
        for table in (module._parameters, module._buffers, module.__dict__ if getattr(module, "_is_replica", False) else {})
        for tensor in table.values()
        if isinstance(tensor, torch.Tensor)
    ]


def current_folded_banks(
    cached: FoldedBanks | None, op: BankOp, modules: Sequence[nn.Module | None], check_content: bool
) -> FoldedBanks:
    """`cached` if it still is what `modules` (finetuned layer, base layer, their norms) fold to, else a fresh
    fold: storage and version counters always compared, and with `check_content` an exact checksum too (edits
    through `.data` bump no version)."""
    sources = folding_sources(modules)
    key = tensors_key(sources)
    digest = content_digest(sources) if check_content else None
    if cached is not None and cached.key == key and (not check_content or _same_digest(cached.digest, digest)):
        return cached
    return fold_banks(op, *modules, key=key, digest=digest)


def _same_digest(cached: torch.Tensor | None, current: torch.Tensor) -> bool:
    return cached is not None and torch.equal(cached, current)


# How each implementation chooses the inference kernel of a layer: "two_bank" (both banks and a select),
# "merged" (per-example merged kernels), "auto" (the cost model: `prefer_merged`, and where both banks would run,
# the agreement split while few filters disagree).
INFERENCE_KERNELS = ("two_bank", "merged", "auto")


def folded_forward(
    op: BankOp, hidden_states: torch.Tensor, gates: torch.Tensor, folded: FoldedBanks, kernel: str
) -> torch.Tensor:
    """Inference from folded banks (the input already `op.prepare`d) through `kernel` of `INFERENCE_KERNELS`."""
    merged, disagreeing = kernel == "merged", None
    if kernel == "auto":
        positions = op.output_positions(hidden_states, folded.weight_finetuned.shape[2:])
        merged = prefer_merged(op, folded.weight_finetuned, positions, hidden_states.shape[0])
        # The split decides on the gates' values on the host: not under torch.compile (a graph break).
        if not merged and hidden_states.shape[0] > 1 and not torch.compiler.is_compiling():
            mask = disagreeing_filters(gates)
            if prefer_split(float(mask.float().mean()), positions):
                disagreeing = mask
    if merged:
        return merged_forward(op, hidden_states, gates, folded)
    if disagreeing is not None:
        split = agreement_split_forward(op, hidden_states, gates, folded, disagreeing)
        if split is not None:
            return split
    return two_bank_forward(op, hidden_states, gates, folded)
