"""Convolutions along the sharded dim.

The halo widths come from :mod:`fxhalo.geometry`, never from a table of layers:
a conv whose every rank reads exactly its own rows (kernel 1, or a patchify
stride that divides the shard) is *proven local* and left untouched; any other
conv over the sharded dim becomes a call to :func:`fxhalo.ops.conv.conv`.

``nn.Conv*d`` with ``padding_mode != 'zeros'`` reaches the graph as
``pad(x, p, mode)`` followed by an unpadded conv.  The pad rule rewrites the pad
on its own; the fusion pass (:mod:`fxhalo.passes.fuse`) then folds it into the
conv's halo, so that one exchange serves both.
"""

from __future__ import annotations

import inspect

from ..domain import Domain
from ..geometry import Unsplittable
from ..halo import Edge
from ..layout import example_value, resized, sharding_of
from ..ops import conv as conv_ops
from . import Decision, KernelCall, Rule, bind, register_op


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...


_CONV_SIG = inspect.signature(_conv_signature)


class ConvRule(Rule):
    name = "conv"

    def decide(self, node, ctx) -> Decision:
        args = bind(_CONV_SIG, node)
        x = args["input"]
        for p in ("weight", "bias"):
            if sharding_of(args[p]) is not None:
                ctx.refuse(node, f"takes a sharded tensor as its {p}", f"pass a replicated {p}")
        s = sharding_of(x)
        if s is None:
            return Decision()
        shape = list(example_value(x).shape)
        shape[s.dim] = s.local
        w_shape = tuple(example_value(args["weight"]).shape)
        nd = len(w_shape) - 2
        sdim = s.dim - (len(shape) - nd)
        if sdim < 0:
            if s.dim == 0 and len(shape) == nd + 2:  # sharded over the batch: each sample is local
                return Decision(s)
            ctx.refuse(
                node,
                f"mixes the channels of a tensor sharded along dim {s.dim}",
                "shard a spatial dim (e.g. shard_dim=2) instead of the channel dim",
            )
        # Only a window along the sharded dim needs each rank's rows as one block; a conv never mixes
        # batch entries, so an interleaved shard in the batch dim (windows of a partition) was local above.
        if not s.contiguous:
            if _pointwise_along(args, w_shape, sdim):  # each output row is its own input row: any layout
                return Decision(s)
            ctx.refuse(
                node,
                f"convolves along a dim whose shards are interleaved with another dim ({s})",
                "apply the convolution before the reshape that merged the sharded dim under another dim",
            )
        n = s.global_length
        domain = Domain(ctx.domain.group_name, ctx.domain.rank, ctx.domain.size, s.dim)
        try:
            _, plan = conv_ops.conv_plan(
                tuple(shape), w_shape, args["stride"], args["padding"], args["dilation"], domain, Edge(), n
            )
        except Unsplittable as e:  # the sizes do not split: say which node, and where
            ctx.refuse(node, e.problem, e.remedy)
        out = resized(s, plan.out_length, ctx.domain)
        return Decision(out, None if plan.local else _kernel_call, s, plan)


def _pointwise_along(args, w_shape, sdim: int) -> bool:
    """Does the conv map each row along spatial dim ``sdim`` to the same row (kernel 1, stride 1, no
    padding: neuraloperator's ChannelMLP, a 1x1 projection)?"""

    def at(value):
        return value if isinstance(value, (int, str)) else value[sdim] if len(value) > 1 else value[0]

    padding = at(args["padding"])
    return w_shape[2 + sdim] == 1 and at(args["stride"]) == 1 and (padding in ("same", "valid") or padding == 0)


def _kernel_call(node) -> KernelCall:
    a = bind(_CONV_SIG, node)
    args = (a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])
    return KernelCall(conv_ops.conv, args, dict(edge_mode="zeros", edge_value=0.0, edge_extent=(0, 0)))


register_op(ConvRule(), "conv1d", "conv2d", "conv3d")
