"""Matrix products (``@``, ``matmul``, ``bmm``): local unless the shard is the contracted dim.

``a @ b`` with ``a`` of shape ``(..., n, k)`` and ``b`` of shape ``(..., k, m)``
contracts ``k``; the leading dims are batch dims, broadcast from the right.  Along
the sharded dim, each rank's output rows then need only its own rows when the shard is

* a batch dim of both operands, laid out alike (the windows of a Swin-style window
  partition: ``q @ k.transpose(-2, -1)`` per window), or a batch dim of one operand
  that the other has with size 1 or not at all;
* the row dim ``n`` of ``a`` (``b`` replicated): tokens times weights;
* the column dim ``m`` of ``b`` (``a`` replicated).

A shard on the contracted dim ``k`` leaves each rank a partial sum; that needs a sum
over the ranks (or a redistribution) and is refused until fxhalo has a contraction
kernel.  1-D operands (vector products) are refused when sharded.
"""

from __future__ import annotations

import operator

from ..layout import Sharded, example_value, sharding_of
from . import LayoutRule, register, register_op


class MatmulRule(LayoutRule):
    name = "matmul"

    def layout(self, node, ctx):
        a, b = node.args[:2]
        sa, sb = sharding_of(a), sharding_of(b)
        if sa is None and sb is None:
            return None
        va, vb, out = example_value(a), example_value(b), example_value(node)
        if va.ndim < 2 or vb.ndim < 2:
            ctx.refuse(node, "multiplies a sharded vector", "use 2-D or batched operands, or gather the vector first")
        # Positions counted from the right: -1 and -2 are the matrix dims, the rest batch dims.
        pa = None if sa is None else sa.dim - va.ndim
        pb = None if sb is None else sb.dim - vb.ndim
        if pa == -1 or pb == -2:
            ctx.refuse(
                node,
                "contracts the sharded dim, which leaves each rank a partial sum",
                "shard a batch or row dim instead, or gather the operand first (fxhalo.gather)",
            )
        if pa == -2 or pb == -1:  # rows of a, or columns of b: the other operand must be whole
            if sa is not None and sb is not None:
                ctx.refuse(
                    node,
                    f"takes both operands sharded ({sa}, {sb}) where only one may be",
                    "shard one operand along its rows or columns, the other not",
                )
            s = sa if pa == -2 else sb
            return s.moved(out.ndim + (pa if pa == -2 else pb))
        pos = pa if pa is not None else pb  # a batch dim
        s = sa if sa is not None else sb
        other, s_other, v_other = (b, sb, vb) if sa is not None else (a, sa, va)
        if s_other is not None:
            if (sb.dim - vb.ndim) != (sa.dim - va.ndim) or not sa.same_layout(sb):
                ctx.refuse(
                    node,
                    f"takes operands sharded differently ({sa}, {sb})",
                    "shard both operands alike along the same batch dim",
                )
        elif v_other.ndim >= -pos and v_other.shape[pos] != 1:
            ctx.refuse(
                node,
                f"broadcasts replicated '{getattr(other, 'name', other)}' of shape {tuple(v_other.shape)} "
                "against the sharded batch dim",
                "shard both operands alike, or give the replicated one size 1 along that dim",
            )
        if not isinstance(s, Sharded):
            return None
        return s.moved(out.ndim + pos)


MATMUL = MatmulRule()
register_op(MATMUL, "matmul", "bmm")
register(MATMUL, operator.matmul, operator.imatmul)
register(MATMUL, "__matmul__", op="call_method")
