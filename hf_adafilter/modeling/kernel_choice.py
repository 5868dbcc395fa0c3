"""Which inference kernel a gated layer runs: the cost model, measured on CPU, over the paths of `gated_inference`
(the live batch-1 merge, per-example merged kernels, the agreement split, both banks and a select).

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import torch

from .bank_ops import BankOp


def disagreeing_filters(gates: torch.Tensor) -> torch.Tensor:
    """Per filter, whether the examples of a batch decide differently on it: a (filters,) bool mask."""
    on = gates > 0.5
    return on.any(0) & ~on.all(0)


def disagreeing_share(gates: torch.Tensor) -> float:
    """The share of filters on which the examples of a batch decide differently."""
    return float(disagreeing_filters(gates).float().mean())


def prefer_split(share: float, output_positions: int) -> bool:
    """Whether the agreement split beats both banks and a select (for a batch of two or more): both banks cost 2x
    a plain conv, the split ~(1 + d) for a disagreeing share d (`share`) plus writing the kernels and the indexing
    around the differing filters (measured one-off on Lite0 and ResNet-50 layer shapes at batch 32, CPU: see
    speed.md's notes). So: a batch whose filters all agree always splits; others while d <= `SPLIT_MAX_DISAGREEMENT`
    on maps of at least `MERGE_MIN_POSITIONS` positions, and on smaller maps (4x4: the overhead weighs more) while
    d <= `SPLIT_MAX_DISAGREEMENT_SMALL_MAPS`."""
    if output_positions < MERGE_MIN_POSITIONS:
        return share <= SPLIT_MAX_DISAGREEMENT_SMALL_MAPS
    return share <= SPLIT_MAX_DISAGREEMENT


SPLIT_MAX_DISAGREEMENT = 0.5
SPLIT_MAX_DISAGREEMENT_SMALL_MAPS = 0.1


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


def updates_incrementally(weight: torch.Tensor) -> bool:
    """Whether the batch-1 kernel is updated row by row (`incremental_merged_kernel`) rather than merged afresh:
    on CPU for large kernels, where writing the kernel dominates; off CPU (unmeasured) never, since one `lerp`
    is one kernel launch while the row updates are several."""
    return weight.device.type == "cpu" and weight.numel() >= INCREMENTAL_MIN_ELEMENTS


def prefer_live(weight: torch.Tensor, batch: int) -> bool:
    """Whether a layer's inference runs `live_merged_forward` (batch 1), not the cached folded banks: everywhere
    but large CPU kernels, whose incremental kernel writes only the rows whose gates changed. Under torch.compile
    always (nothing is cached there)."""
    return batch == 1 and (torch.compiler.is_compiling() or not updates_incrementally(weight))


MERGE_MIN_POSITIONS = 32
MERGE_MAX_ELEMENTS = 1 << 21
# Batch-1 kernels of at least this many elements are updated in place (`incremental_merged_kernel`); below it the
# few extra small ops cost more than rewriting the kernel (measured on Lite0 and ResNet-50 layers, CPU).
INCREMENTAL_MIN_ELEMENTS = 1 << 18
