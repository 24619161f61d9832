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

Operands sharded along *different* indices (attention's queries and keys inside each
window, the tokens ``i`` and ``j``) cannot multiply where they are.  When every
operand and the output share another index (the windows, a batch), each sharded
operand moves its shard onto that index (:func:`product_on_carrier`; operands of one
shape travel together in one ``all_to_all_single``) and the product is local there.

A ``linear``'s bias belongs to one summand: rank 0 adds it, the others add it times
zero (the same graph on every rank, and the bias's gradient, synced over the ranks
as every parameter's is, comes out whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domain import Domain, ShardAxis, one_axis, several_axes

__all__ = ["product", "product_on_carrier"]

#: the products by name (FX prints a name in the graph's code; a function object it cannot)
_PRODUCTS = {"einsum": torch.einsum, "matmul": torch.matmul, "linear": F.linear}


@several_axes(when=lambda args, kwargs: kwargs.get("bias") is None)
def product(name: str, operands, narrow: tuple, *, prefix: tuple = (), bias=None, axes: tuple[ShardAxis, ...]):
    """``_PRODUCTS[name](*prefix, *operands)`` on this rank's rows; ``narrow[i]``: the dim of replicated
    operand ``i`` to cut to this rank's rows (``None``: leave it).  With a ``bias`` the product contracts
    the shard: rank 0's summand takes the bias.  On several mesh axes (no bias), ``narrow`` holds one such
    tuple per axis of ``axes``: each axis cuts its own dims."""
    per_axis = narrow if len(axes) > 1 else (narrow,)
    cut = list(operands)
    for axis, narrows in zip(axes, per_axis):
        shard_dim, group_name, length = one_axis((axis,))
        domain = Domain.from_group(group_name, shard_dim=shard_dim)
        a, b = domain.bounds(length)
        cut = [x if d is None else x.narrow(d, a, b - a) for x, d in zip(cut, narrows)]
    out = _PRODUCTS[name](*prefix, *cut)
    return out if bias is None else out + bias * float(domain.rank == 0)


def product_on_carrier(
    name: str, operands, moves: tuple, narrow: tuple, lengths: tuple, *, prefix: tuple = (), axes: tuple[ShardAxis, ...]
):
    """``_PRODUCTS[name](*prefix, *operands)`` with every operand sharded along the carrier index: operand
    ``i`` with ``moves[i] = (src_dim, dst_dim, src_lengths)`` moves its shard from ``src_dim`` to
    ``dst_dim``, split as ``lengths``; a replicated one with ``narrow[i]`` set is cut to this rank's rows
    of that dim.  Operands of one shape, dtype and move travel in one collective."""
    from ..redistribute import redistribute_slabs

    shard_dim, group_name, _ = one_axis(axes)
    rank = Domain.from_group(group_name, shard_dim=shard_dim).rank
    a = sum(lengths[:rank])
    cut = [x if d is None else x.narrow(d, a, lengths[rank]) for x, d in zip(operands, narrow)]
    together: dict = {}
    for i, (x, move) in enumerate(zip(operands, moves)):
        if move is not None:
            together.setdefault((tuple(x.shape), x.dtype, move), []).append(i)
    for (_, _, (src, dst, src_lengths)), members in together.items():
        moved = redistribute_slabs([operands[i] for i in members], src, dst, group_name, src_lengths, lengths, rank)
        for i, x in zip(members, moved):
            cut[i] = x
    return _PRODUCTS[name](*prefix, *cut)
