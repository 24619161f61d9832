"""``fxhalo.redistribute(x, dim)`` in a compiled region: the graph op ``fxhalo::redistribute``.

Globally the op is the identity (the same values).  Its rule gives the output the
shard along ``dim`` (the balanced partition, or the lengths given) and rewrites the
node to :func:`fxhalo.ops.moves.move_shard`, one ``all_to_all_single``.  On a value
already sharded that way it is local; on a replicated value it is a free slice
(:func:`fxhalo.ops.moves.own_rows`).
"""

from __future__ import annotations

import torch

from ..layout import Sharded, example_value, sharding_of
from ..ops import moves
from . import Decision, KernelCall, Rule, register
from .resample import require_contiguous


class RedistributeRule(Rule):
    name = "redistribute"

    def decide(self, node, ctx) -> Decision:
        x, dim = node.args[0], node.args[1]
        lengths = node.args[2] if len(node.args) > 2 else node.kwargs.get("lengths")
        s = sharding_of(x)
        local = example_value(x)
        dim = int(dim) % local.ndim
        n = int(s.global_length) if isinstance(s, Sharded) and s.dim == dim else local.shape[dim]
        want = tuple(int(v) for v in lengths) if lengths is not None else ctx.domain.lengths(n)
        if sum(want) != n or len(want) != ctx.domain.size:
            ctx.refuse(node, f"splits {n} rows as {list(want)} over {ctx.domain.size} ranks", "give lengths that fit")
        out = Sharded(dim, want[ctx.domain.rank], ctx.domain.length_of(want))
        if s is None:  # replicated: each rank keeps its rows
            axes = ctx.domain.kernel_axes(dim, out.global_length)
            return Decision(out, lambda node: KernelCall(moves.own_rows, (node.args[0],), {"axes": axes}))
        require_contiguous(node, ctx, s)
        if s.dim == dim:
            if ctx.domain.lengths(s.global_length) == want:
                return Decision(s)
            return Decision(out, lambda node: KernelCall(moves.repartition, (node.args[0], want)), s)
        return Decision(out, lambda node: KernelCall(moves.move_shard, (node.args[0], dim, want)), s)


register(RedistributeRule(), torch.ops.fxhalo.redistribute.default)
