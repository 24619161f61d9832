"""Products (``@``, ``matmul``, ``bmm``, ``linear``, ``einsum``): local, or a sum when they contract the shard.

``a @ b`` with ``a`` of shape ``(..., n, k)`` and ``b`` of shape ``(..., k, m)``
contracts ``k``; the leading dims are batch dims, broadcast from the right.  Along
the sharded dim, each rank's output rows then need only its own rows when the shard is

* a batch dim of both operands, laid out alike (the windows of a Swin-style window
  partition: ``q @ k.transpose(-2, -1)`` per window), or a batch dim of one operand
  that the other has with size 1 or not at all;
* the row dim ``n`` of ``a`` (``b`` replicated): tokens times weights;
* the column dim ``m`` of ``b`` (``a`` replicated).

A shard on the contracted dim ``k`` leaves each rank a partial sum: the product runs
on each rank's rows (a replicated operand cut to them, in the global view,
:func:`fxhalo.ops.contract.product`) and the output is :class:`~fxhalo.layout.Partial`,
summed once where it is needed (:mod:`fxhalo.rules.partial`).  ``F.linear`` over a
sharded feature dim is the same contraction (the bias in one rank's summand), and
``torch.einsum`` follows the same two cases by its indices.
1-D operands (vector products) are refused when sharded.
"""

from __future__ import annotations

import operator

import torch

from ..layout import PARTIAL, Sharded, example_value, sharding_of
from ..layout import split as layout_split
from ..ops import contract
from . import Decision, KernelCall, Rule, register, register_op


def contraction(node, ctx, operands, layouts, dims: tuple[int, int], name: str, bias=None) -> Decision:
    """The decision for a product that contracts the sharded dim: operand ``i``'s contracted dim is
    ``dims[i]``.  A sharded operand must be sharded there; a replicated one spanning it is cut to
    each rank's rows (global view only).  The output is the ranks' partial products."""
    s = next(lay for lay in layouts if lay is not None)
    narrow = []
    for x, lay, d in zip(operands, layouts, dims):
        v = example_value(x)
        if lay is not None:
            if not isinstance(lay, Sharded) or lay.dim != d or not lay.same_layout(s) or not lay.contiguous:
                ctx.refuse(
                    node,
                    f"contracts operands laid out differently ({', '.join(str(lay) for lay in layouts)})",
                    "shard both operands alike along the contracted dim, or one of them only",
                )
            narrow.append(None)
        elif v.shape[d] == int(s.global_length) and ctx.global_view:
            narrow.append(d)
        else:
            ctx.refuse(
                node,
                "contracts the sharded dim against a replicated operand of another length",
                "pass DomainTensors (the global view cuts the replicated operand to each rank's rows)",
            )
    narrow = tuple(narrow)

    def call(node) -> KernelCall:
        kwargs = {} if bias is None else {"bias": node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")}
        return KernelCall(contract.product, (name, list(node.args[:2]), narrow), kwargs)

    return Decision(PARTIAL, call, s)


class MatmulRule(Rule):
    name = "matmul"

    def decide(self, node, ctx) -> Decision:
        a, b = node.args[:2]
        sa, sb = sharding_of(a), sharding_of(b)
        va, vb = example_value(a), example_value(b)
        pa = None if sa is None else sa.dim - va.ndim
        pb = None if sb is None else sb.dim - vb.ndim
        if (pa == -1 or pb == -2) and va.ndim >= 2 and vb.ndim >= 2:
            return contraction(node, ctx, [a, b], [sa, sb], (va.ndim - 1, vb.ndim - 2), "matmul")
        return Decision(self.layout(node, ctx))

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


# -- einsum ------------------------------------------------------------------------------------


def einsum_terms(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """Each operand's index per dim and the output's, with ``...`` spelled out as one token per
    broadcast dim (aligned from the right, as torch aligns them) and the implicit output made explicit."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    raw = lhs.split(",")
    widths = [nd - len(t.replace("...", "")) if "..." in t else 0 for t, nd in zip(raw, ndims)]
    width = max(widths, default=0)
    ell = [f"...{i}" for i in range(width)]

    def spell(t: str, w: int) -> list[str]:
        head, dots, tail = t.partition("...")
        return [*head, *(ell[width - w :] if dots else []), *tail]

    terms = [spell(t, w) for t, w in zip(raw, widths)]
    if arrow:
        out = spell(rhs, width)
    else:
        letters = [c for t in raw for c in t.replace("...", "")]
        out = [*ell, *sorted(c for c in set(letters) if letters.count(c) == 1)]
    return terms, out


class EinsumRule(Rule):
    """``torch.einsum`` with sharded operands: local when the sharded index survives into the output,
    a partial sum (:class:`~fxhalo.layout.Partial`) when the product contracts it."""

    name = "einsum"

    @staticmethod
    def _operands(node) -> list:
        rest = list(node.args[1:])
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest

    def decide(self, node, ctx) -> Decision:
        operands = self._operands(node)
        layouts = [sharding_of(x) for x in operands]
        sharded = [(i, s) for i, s in enumerate(layouts) if s is not None]
        if not sharded:
            return Decision()
        values = [example_value(x) for x in operands]
        terms, out_terms = einsum_terms(node.args[0], [v.ndim for v in values])
        letters = {terms[i][s.dim] for i, s in sharded}
        first = sharded[0][1]
        if len(letters) != 1 or not all(isinstance(s, Sharded) and s.same_layout(first) for _, s in sharded):
            moved = self._on_carrier(node, ctx, terms, out_terms, values, layouts)
            if moved is not None:
                return moved
            ctx.refuse(
                node,
                "takes operands sharded along different indices or partitions: "
                + ", ".join(f"{terms[i][s.dim]} {s}" for i, s in sharded),
                "shard the operands alike along one index",
            )
        (index,) = letters
        narrow = []
        for i, (term, v) in enumerate(zip(terms, values)):
            if term.count(index) > 1:
                ctx.refuse(node, f"repeats the sharded index {index!r} in one operand", "gather it first")
            if layouts[i] is not None or index not in term or v.shape[term.index(index)] == 1:
                narrow.append(None)
                continue
            pos = term.index(index)
            if v.shape[pos] != int(first.global_length) or not ctx.global_view:
                ctx.refuse(
                    node,
                    f"broadcasts replicated operand {i} of shape {tuple(v.shape)} against the sharded index {index!r}",
                    "shard that operand too, or pass DomainTensors (the global view cuts it to each rank's rows)",
                )
            narrow.append(pos)
        contracts = index not in out_terms
        out = PARTIAL if contracts else first.moved(out_terms.index(index))
        if not contracts and all(n is None for n in narrow):
            return Decision(out)
        equation, narrow = node.args[0], tuple(narrow)

        def call(node) -> KernelCall:
            return KernelCall(contract.product, ("einsum", self._operands(node), narrow), {"prefix": (equation,)})

        return Decision(out, call, first)

    def combined_call(self, node, calls):
        """On a mesh, two axes each cutting replicated operands to their rows (an FNO's weights, along the
        two mode dims): one :func:`fxhalo.ops.contract.product` that cuts along every axis, ``narrow`` one
        tuple per axis.  ``None`` for anything else (a contraction, a move onto a carrier).  ``calls``: each
        axis's own kernel call."""
        if not all(c.kernel is contract.product and c.args[0] == "einsum" and not c.kwargs.get("bias") for c in calls):
            return None
        narrows, kwargs = tuple(c.args[2] for c in calls), calls[0].kwargs

        def call(node) -> KernelCall:
            return KernelCall(contract.product, ("einsum", self._operands(node), narrows), kwargs)

        return call

    def _on_carrier(self, node, ctx, terms, out_terms, values, layouts) -> Decision | None:
        """Operands sharded along different indices (queries ``i`` and keys ``j`` of attention inside each
        window): each moves its shard onto an index that every operand and the output share (the
        windows), where the product is local; ``None`` when no index can carry it."""
        sharded = [(t, s) for t, s in zip(terms, layouts) if s is not None]
        if any(not isinstance(s, Sharded) or not s.contiguous or t.count(t[s.dim]) > 1 for t, s in sharded):
            return None

        def global_size(t, v, s, c):
            return int(s.global_length) if s is not None and t[s.dim] == c else v.shape[t.index(c)]

        def stays(t, s, c, n):  # already sharded along c, split as the carrier will be
            return s is not None and t[s.dim] == c and ctx.domain.lengths(s.global_length) == ctx.domain.lengths(n)

        # The fewest moves, then the leftmost index of the output (the batch, the windows: heads or
        # features would put the shard where the next op mixes them).
        best = None
        for c in out_terms:
            if not all(t.count(c) == 1 for t in terms):
                continue
            sizes = {global_size(t, v, s, c) for t, v, s in zip(terms, values, layouts)}
            if len(sizes) != 1 or (n := sizes.pop()) < ctx.domain.size:
                continue
            key = (sum(stays(t, s, c, n) for t, s in sharded), -out_terms.index(c), n, c)
            best = max(best, key) if best is not None else key
        if best is None:
            return None
        *_, n, c = best
        lengths = tuple(ctx.domain.lengths(n))
        moves = tuple(
            None if s is None or stays(t, s, c, n) else (s.dim, t.index(c), tuple(ctx.domain.lengths(s.global_length)))
            for t, s in zip(terms, layouts)
        )
        narrow = tuple(t.index(c) if s is None else None for t, s in zip(terms, layouts))
        equation = node.args[0]

        def call(node) -> KernelCall:
            args = ("einsum", self._operands(node), moves, narrow, lengths)
            return KernelCall(contract.product_on_carrier, args, {"prefix": (equation,)})

        return Decision(layout_split(out_terms.index(c), n, ctx.domain), call, sharded[0][1])


register(EinsumRule(), torch.einsum, torch.functional.einsum)


class LinearRule(Rule):
    """``F.linear(x, weight, bias)``: local unless the feature dim (the last) is sharded, which it contracts."""

    name = "linear"

    def decide(self, node, ctx) -> Decision:
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        s = sharding_of(x)
        for p in node.all_input_nodes[1:]:
            if sharding_of(p) is not None:
                ctx.refuse(node, f"takes sharded tensor '{p.name}' as a parameter", "pass replicated parameters")
        if s is None:
            return Decision()
        nd = example_value(x).ndim
        if s.dim != nd - 1:
            return Decision(s)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return contraction(node, ctx, [x, w], [s, None], (nd - 1, 1), "linear", bias=bias)


register_op(LinearRule(), "linear")
