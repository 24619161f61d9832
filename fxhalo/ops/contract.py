"""Products with a sharded operand: ``einsum``, ``matmul``, ``linear``.

Every rank multiplies what it holds.  A *replicated* operand that spans the sharded
index is first cut to this rank's rows of it (``narrow``: no communication; its
gradient is then partial, as a replicated value's gradient is inside a graph, see
:mod:`fxhalo.ops.collectives`).  Then:

* when the sharded index survives into the output (a batch-like index: the Fourier
  modes of an FNO's channel mixing, the rows of a token matrix), the product is this
  rank's rows of the output: nothing more to do;
* when the product **contracts** the sharded index, every rank holds a partial sum
  (:class:`fxhalo.layout.Partial`): the pass sums it once, where the value is first
  needed whole (an all-reduce) or sharded again (a reduce-scatter), after any ops
  linear in it (:mod:`fxhalo.rules.partial`).

A ``linear``'s bias belongs to one summand: rank 0 adds it, the others add it times
zero (the same graph on every rank, and the bias's gradient, synced over the ranks
as every parameter's is, comes out whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domain import Domain, ShardAxis, one_axis

__all__ = ["product"]

#: the products by name (FX prints a name in the graph's code; a function object it cannot)
_PRODUCTS = {"einsum": torch.einsum, "matmul": torch.matmul, "linear": F.linear}


def product(name: str, operands, narrow: tuple, *, prefix: tuple = (), bias=None, axes: tuple[ShardAxis, ...]):
    """``_PRODUCTS[name](*prefix, *operands)`` on this rank's rows; ``narrow[i]``: the dim of replicated
    operand ``i`` to cut to this rank's rows (``None``: leave it).  With a ``bias`` the product contracts
    the shard: rank 0's summand takes the bias."""
    shard_dim, group_name, length = one_axis(axes)
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    a, b = domain.bounds(length)
    cut = [x if d is None else x.narrow(d, a, b - a) for x, d in zip(operands, narrow)]
    out = _PRODUCTS[name](*prefix, *cut)
    return out if bias is None else out + bias * float(domain.rank == 0)
