"""Adaptive pooling over a sharded spatial dim, 1-D to 3-D.

Adaptive pooling bins output row ``o`` over ``[floor(o*N/M), ceil((o+1)*N/M))``.
With even shards the bin edges at rank boundaries are whole rows
(``c*N/M = r*N/P``), so every bin lies inside one shard and the local adaptive op
with this rank's share of the output reproduces the global bins exactly: no
exchange at all.  :func:`plan_adaptive` checks this per rank, falls back to a halo
when a bin straddles (uneven shards), and refuses when neither reproduces the bins.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch.nn.functional as F

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..geometry import Unsplittable, split_rows
from ..halo import HaloPlan, takes_received_rows
from .pool import _domain_and_dim, global_indices
from .rows import ceil_div, halo_plan

__all__ = [
    "AdaptivePlan",
    "plan_adaptive",
    "adaptive_bins",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
]

_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def adaptive_bins(n: int, m: int, o: int) -> tuple[int, int]:
    """torch's adaptive-pooling bin of output row ``o``: ``[floor(o*n/m), ceil((o+1)*n/m))``."""
    return (o * n) // m, ceil_div((o + 1) * n, m)


@dataclasses.dataclass(frozen=True)
class AdaptivePlan:
    """An adaptive pool on one rank: ``rows`` out of ``m``; ``halo`` is None when local."""

    n: int
    m: int
    rows: tuple[int, int]
    start: int
    halo: HaloPlan | None


def _reproduces(lo: int, hi: int, c: int, e: int, n: int, m: int) -> bool:
    """Does the adaptive op on global rows ``[lo, hi)`` with ``e - c`` outputs give bins ``c..e-1``?"""
    return all(
        (s0 + lo, e0 + lo) == adaptive_bins(n, m, c + j)
        for j, (s0, e0) in enumerate(adaptive_bins(hi - lo, e - c, j) for j in range(e - c))
    )


@functools.lru_cache(maxsize=1024)
def plan_adaptive(domain: Domain, n: int, m: int, what: str) -> AdaptivePlan:
    """Plan an adaptive pool from ``n`` to ``m`` global rows."""
    if m == 1 and domain.size > 1:
        raise Unsplittable(
            what,
            "pools the sharded dim to one row, which is a reduction over all ranks rather than a window",
            "pool the values only (a reduction), or gather first",
        )
    in_part, out_part = split_rows(domain, n, m, what)
    c, e = out_part[domain.rank]
    if all(_reproduces(a, b, c0, e0, n, m) for (a, b), (c0, e0) in zip(in_part, out_part)):
        return AdaptivePlan(n, m, (c, e), in_part[domain.rank][0], None)
    needs = tuple((adaptive_bins(n, m, c0)[0], adaptive_bins(n, m, e0 - 1)[1]) for c0, e0 in out_part)
    if all(_reproduces(s, t, c0, e0, n, m) for (s, t), (c0, e0) in zip(needs, out_part)):
        return AdaptivePlan(n, m, (c, e), needs[domain.rank][0], halo_plan(in_part, needs, domain.rank))
    raise Unsplittable(
        what,
        f"pools {n} global rows into {m} bins, and the bins of some rank's "
        "output rows are not those of an adaptive pool over any slab of its rows",
        "choose an output size that divides the input size, or pool before sharding",
    )


def _adaptive_pool(nd, kind, input, output_size, return_indices, axes):
    """Each sharded dim planned on its own (its bins, and the halo they need on uneven shards), the halos
    exchanged at once (one axis: the 1-D exchange; several: the block's, :mod:`fxhalo.block_halo`), then
    torch's adaptive op with this rank's share of the output along each sharded dim: the bins of a 2-D or
    3-D adaptive pool are products of the 1-D ones."""
    op = _ADAPTIVE_MAX[nd] if kind == "max" else _ADAPTIVE_AVG[nd]
    extra = (return_indices,) if kind == "max" else ()
    sizes = list(output_size) if isinstance(output_size, (tuple, list)) else [output_size] * nd
    what = f"adaptive_{kind}_pool{nd}d (output size {tuple(sizes)})"
    exchanges, starts = {}, []
    for a, (shard_dim, group_name, length) in enumerate(each_axis(axes)):
        domain, dim, sdim = _domain_and_dim(input, nd, shard_dim, group_name)
        if sdim is None:  # batch or channel sharded: every plane is pooled on its own rank
            continue
        n = domain.global_length(input.shape[dim], length)
        m = n if sizes[sdim] is None else int(sizes[sdim])  # None keeps the (global) input size
        plan = plan_adaptive(domain, n, m, what)
        if plan.halo is not None:
            exchanges[a] = (dim, plan.halo, None)
        sizes[sdim] = plan.rows[1] - plan.rows[0]
        starts.append((dim, n, plan.start))
    x = exchange_on_axes(input, axes, exchanges)
    out = op(x, tuple(sizes), *extra)
    if not (kind == "max" and return_indices) or not starts:
        return out
    # Indices into the extended block -> into the global input, one sharded dim at a time, innermost first:
    # then the dims after the one being converted already have their global sizes.
    values, idx = out
    sizes_now = list(x.shape)
    for dim, n, start in sorted(starts, reverse=True):
        inner = math.prod(sizes_now[dim + 1 :])
        idx = global_indices(idx, inner, sizes_now[dim], n, start)
        sizes_now[dim] = n
    return values, idx


@several_axes
def adaptive_pool_dim_by_dim(input, output_size, *, nd: int, kind: str, axes: tuple[ShardAxis, ...]):
    """An adaptive pool (values) over several sharded dims, some pooled to one value along their dim
    and some to windows: one spatial dim at a time, the innermost first.  A dim pooled to one value
    along a sharded dim is a reduction over that axis's ranks (:func:`fxhalo.ops.reduce.adaptive_avg_pool`
    / ``adaptive_max_pool``), a windowed sharded dim that axis's 1-D kernel, any other dim torch's op.

    The bins are products of 1-D bins, so the average of the averages over each dim is the bin's
    average.  For the maximum, innermost first gives torch's tie rule: each row's first maximum, then
    the first row whose maximum is the bin's, is the bin's first maximum in scan order."""
    from . import reduce as reduce_ops  # reduce's kernels are the reductions' (no cycle at import)

    sizes = list(output_size) if isinstance(output_size, (tuple, list)) else [output_size] * nd
    sharded = {}
    for axis in each_axis(axes):
        _, _, sdim = _domain_and_dim(input, nd, axis.dim, axis.group_name)
        if sdim is not None:
            sharded[sdim] = axis
    x = input
    for sdim in reversed(range(nd)):
        if sizes[sdim] is None:
            continue
        step = tuple(sizes[sdim] if i == sdim else None for i in range(nd))
        axis = sharded.get(sdim)
        if axis is None:
            x = (_ADAPTIVE_MAX if kind == "max" else _ADAPTIVE_AVG)[nd](x, step)
        elif int(sizes[sdim]) == 1:
            reduce = reduce_ops.adaptive_max_pool if kind == "max" else reduce_ops.adaptive_avg_pool
            x = reduce(x, step, nd=nd, axes=(axis,))
        else:
            x = _adaptive_pool(nd, kind, x, step, False, (axis,))
    return x


@takes_received_rows
@several_axes
def adaptive_avg_pool1d(input, output_size, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_avg_pool1d``; ``output_size`` along a sharded dim is the global length."""
    return _adaptive_pool(1, "avg", input, output_size, False, axes)


@takes_received_rows
@several_axes
def adaptive_avg_pool2d(input, output_size, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_avg_pool2d``; ``output_size`` along a sharded dim is the global length."""
    return _adaptive_pool(2, "avg", input, output_size, False, axes)


@takes_received_rows
@several_axes
def adaptive_avg_pool3d(input, output_size, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_avg_pool3d``; ``output_size`` along a sharded dim is the global length."""
    return _adaptive_pool(3, "avg", input, output_size, False, axes)


@takes_received_rows
@several_axes
def adaptive_max_pool1d(input, output_size, return_indices=False, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_max_pool1d``; indices refer to the global input."""
    return _adaptive_pool(1, "max", input, output_size, return_indices, axes)


@takes_received_rows
@several_axes
def adaptive_max_pool2d(input, output_size, return_indices=False, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_max_pool2d``; indices refer to the global input."""
    return _adaptive_pool(2, "max", input, output_size, return_indices, axes)


@takes_received_rows
@several_axes
def adaptive_max_pool3d(input, output_size, return_indices=False, *, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_max_pool3d``; indices refer to the global input."""
    return _adaptive_pool(3, "max", input, output_size, return_indices, axes)
