"""Products with a sharded operand: ``einsum``, ``matmul``, ``linear``.

Every rank multiplies what it holds.  A *replicated* operand that spans the sharded
index is first cut to this rank's rows of it (``narrow``: no communication; its
gradient is then partial, as a replicated value's gradient is inside a graph, see
:mod:`fxhalo.ops.collectives`).  Then:

* when the sharded index survives into the output (a batch-like index: the Fourier
  modes of an FNO's channel mixing, the rows of a token matrix), the product is this
  rank's rows of the output: nothing more to do;
* when the product **contracts** the sharded index, every rank holds a partial sum,
  and one sum over the group (:func:`~fxhalo.ops.collectives.all_reduce_sum`) makes
  the replicated result.  Its backward gives each rank the full upstream gradient,
  from which the local product's backward takes this rank's rows.

A ``linear``'s bias is added once, after the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domain import Domain, ShardAxis, one_axis
from .collectives import all_reduce_sum

__all__ = ["product"]

#: the products by name (FX prints a name in the graph's code; a function object it cannot)
_PRODUCTS = {"einsum": torch.einsum, "matmul": torch.matmul, "linear": F.linear}


def product(
    name: str, operands, narrow: tuple, contracts: bool, *, prefix: tuple = (), bias=None, axes: tuple[ShardAxis, ...]
):
    """``_PRODUCTS[name](*prefix, *operands)`` on this rank's rows; ``narrow[i]``: the dim of replicated
    operand ``i`` to cut to this rank's rows (``None``: leave it); ``contracts``: sum the partial products
    over the group (then add ``bias``)."""
    shard_dim, group_name, length = one_axis(axes)
    a, b = Domain.from_group(group_name, shard_dim=shard_dim).bounds(length)
    cut = [x if d is None else x.narrow(d, a, b - a) for x, d in zip(operands, narrow)]
    out = _PRODUCTS[name](*prefix, *cut)
    if contracts:
        out = all_reduce_sum(out, group_name)
    return out if bias is None else out + bias
