"""Scans along the sharded dim: ``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin``.

Row ``i`` of a scan combines every row up to ``i``.  Rank ``r`` scans its own rows,
then needs only one row from the ranks before it: their combined total (the
*exclusive prefix*).  One ``all_gather`` of every rank's last scanned row brings all
totals; rank ``r`` combines those of ranks ``0 .. r-1`` and applies the result to its
rows (adds, multiplies, log-add-exps, or keeps the running extreme).  The backward is
autograd's through the gather (a reduce-scatter): each rank's total receives the
gradients of the rows after it on later ranks.

``cummax`` / ``cummin`` also return indices.  Torch's scan takes a new extreme on a
tie (``>=`` for max, ``<=`` for min: the *last* index of the extreme) and on every
NaN, and keeps a NaN once it has one.  Combining an earlier part ``(pv, pi)`` with a
later one ``(lv, li)`` by the same test (take the later when ``lv`` is NaN, or when
``pv`` is not NaN and ``lv >= pv``) gives exactly the sequential answer, so the
totals fold in rank order and then onto the local rows.  Values and indices travel
in one gather (as float64 for floating values: indices below 2**53 are exact).
"""

from __future__ import annotations

import operator

import torch

from ..domain import Domain, ShardAxis, one_axis
from .collectives import all_gather_stacked

__all__ = ["cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"]


def _last_row(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.narrow(d, t.shape[d] - 1, 1)  # this rank's total (shards are never empty)


def _scan(input, dim, local_scan, combine_prefix, apply_prefix, axes):
    shard_dim, group_name, _ = one_axis(axes)
    d = dim % input.ndim
    local = local_scan(input, d)
    totals = all_gather_stacked(_last_row(local, d), group_name)  # [P, ...]: every rank's total, in rank order
    rank = Domain.from_group(group_name, shard_dim=shard_dim).rank
    # Rank 0 combines no totals: the empty combination is the identity (0, 1 or -inf), and its
    # output still reads the gather, so no compiler drops rank 0's collective alone.
    return apply_prefix(local, combine_prefix(totals[:rank]))


def cumsum(input, dim, *, dtype=None, axes: tuple[ShardAxis, ...]):
    """``torch.cumsum`` along the sharded dim: the local scan plus the sum of the ranks before."""
    return _scan(input, dim, lambda x, d: torch.cumsum(x, d, dtype=dtype), lambda t: t.sum(0), torch.add, axes)


def cumprod(input, dim, *, dtype=None, axes: tuple[ShardAxis, ...]):
    """``torch.cumprod`` along the sharded dim: the local scan times the product of the ranks before."""
    return _scan(input, dim, lambda x, d: torch.cumprod(x, d, dtype=dtype), lambda t: t.prod(0), torch.mul, axes)


def logcumsumexp(input, dim, *, axes: tuple[ShardAxis, ...]):
    """``torch.logcumsumexp`` along the sharded dim: ``logaddexp`` of the local scan and the ranks before."""
    return _scan(input, dim, torch.logcumsumexp, lambda t: torch.logsumexp(t, 0), torch.logaddexp, axes)


def _gather_pairs(values: torch.Tensor, indices: torch.Tensor, group_name: str):
    """Every rank's ``(values, indices)``, stacked along a new dim 0: one all_gather for floating values."""
    if values.is_floating_point():
        both = all_gather_stacked(torch.stack([values.double(), indices.double()]), group_name)
        return both[:, 0].to(values.dtype), both[:, 1].long()
    return all_gather_stacked(values, group_name), all_gather_stacked(indices, group_name)


def _running_extreme(input, dim, scan, later_wins, identity, axes):
    shard_dim, group_name, n = one_axis(axes)
    d = dim % input.ndim
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    starts = [a for a, _ in domain.partition(n)]
    values, indices = scan(input, d)
    indices = indices + starts[domain.rank]  # global row numbers
    tv, ti = _gather_pairs(_last_row(values, d), _last_row(indices, d), group_name)

    def combine(pv, pi, lv, li):
        take = (
            torch.isnan(lv) | (~torch.isnan(pv) & later_wins(lv, pv)) if lv.is_floating_point() else later_wins(lv, pv)
        )
        return torch.where(take, lv, pv), torch.where(take, li, pi)

    # The fold starts from the identity, which every later part beats; adding the empty
    # slices' sums keeps rank 0's result reading the gather (see _scan).
    pv = torch.full_like(tv[0], identity(values.dtype)) + tv[:0].sum(0, dtype=tv.dtype)
    pi = torch.zeros_like(ti[0]) + ti[:0].sum(0)
    for q in range(domain.rank):
        pv, pi = combine(pv, pi, tv[q], ti[q])
    return combine(pv, pi, values, indices)


def _lowest(dtype):
    return -float("inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype):
    return float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max


def cummax(input, dim, *, axes: tuple[ShardAxis, ...]):
    """``torch.cummax`` along the sharded dim: ``(values, global indices)``, ties and NaNs as torch takes them."""
    return _running_extreme(input, dim, torch.cummax, operator.ge, _lowest, axes)


def cummin(input, dim, *, axes: tuple[ShardAxis, ...]):
    """``torch.cummin`` along the sharded dim: ``(values, global indices)``, ties and NaNs as torch takes them."""
    return _running_extreme(input, dim, torch.cummin, operator.le, _highest, axes)
