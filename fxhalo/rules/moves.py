"""``fxhalo.redistribute(x, dim)`` in a compiled region: the graph op ``fxhalo::redistribute``.

Globally the op is the identity (the same values).  Its rule gives the output the
shard along ``dim`` (the balanced partition, or the lengths given) and rewrites the
node to :func:`fxhalo.ops.moves.move_shard`, one ``all_to_all_single``.  On a value
already sharded that way it is local; on a replicated value it is a free slice
(:func:`fxhalo.ops.moves.own_rows`).
"""

from __future__ import annotations

import torch

from ..errors import FxHaloError
from ..layout import Sharded, example_value, global_shape_of, layout_of, sharding_of, split_axes
from ..ops import moves
from ..redistribute import plan_mesh_moves
from . import Decision, KernelCall, Rule, decided_on_mesh, register
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


class RedistributeOnMesh(Rule):
    """``fxhalo.redistribute(x, (d1, d2))`` on a mesh (the op ``fxhalo::redistribute_mesh``): the moves of
    :func:`fxhalo.redistribute.plan_mesh_moves`, planned once over every axis (``decide_on_mesh``)."""

    name = "redistribute"

    def decide(self, node, ctx) -> Decision:
        if sharding_of(node.args[0]) is None:
            return Decision()
        ctx.refuse(
            node, "moves the shards of several mesh axes on a one-axis domain", "use fxhalo.redistribute(x, dim)"
        )

    def decide_on_mesh(self, node, ctx) -> Decision:
        x, dims = node.args[0], tuple(int(d) for d in node.args[1])
        layout = layout_of(x)
        axes = split_axes(layout)
        if not axes:
            return Decision()
        for _, s in axes:
            require_contiguous(node, ctx, s)
        shape = global_shape_of(x)
        try:
            plan = plan_mesh_moves(
                tuple(shape), tuple((s.dim, ctx.mesh.axes[a].lengths(s.global_length)) for a, s in axes), dims
            )
        except FxHaloError as e:
            ctx.refuse(node, str(e).split(". Remedy")[0].removeprefix("redistribute: "), "move the shards in two calls")
        targets = [(d, shape[d]) if d != s.dim else None for (_, s), d in zip(axes, dims)]

        def call(node) -> KernelCall:
            return KernelCall(moves.move_shards, (node.args[0], plan))

        return decided_on_mesh(ctx, layout, axes, targets, call, plan)


register(RedistributeOnMesh(), torch.ops.fxhalo.redistribute_mesh.default)
