"""Scans along the sharded dim: ``cumsum``, ``cumprod``, ``logcumsumexp``.

Row ``i`` of a scan combines every row up to ``i``.  Rank ``r`` scans its own rows,
then needs only one number per column from the ranks before it: their combined
total (the *exclusive prefix*).  One ``all_gather`` of every rank's last scanned row
brings all totals; rank ``r`` combines those of ranks ``0 .. r-1`` and applies them
to its rows (adds, multiplies, or log-add-exps).  (``cummax`` and ``cummin`` return
indices too, whose ties would have to follow torch's choice across ranks: refused
along the sharded dim.)  The backward is autograd's through
the gather (a reduce-scatter): each rank's total receives the gradients of the rows
after it on later ranks.
"""

from __future__ import annotations

import torch

from ..domain import Domain, ShardAxis, one_axis
from .collectives import all_gather_stacked

__all__ = ["cumsum", "cumprod", "logcumsumexp"]


def _scan(input, dim, local_scan, combine_prefix, apply_prefix, axes):
    shard_dim, group_name, _ = one_axis(axes)
    d = dim % input.ndim
    local = local_scan(input, d)
    last = local.narrow(d, local.shape[d] - 1, 1)  # this rank's total (shards are never empty)
    totals = all_gather_stacked(last, group_name)  # [P, ...]: every rank's total, in rank order
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
