"""Convolutions along the sharded dim, and the ``F.pad`` that feeds them.

The halo widths come from :mod:`fxhalo.geometry`, never from a table of layers:
a conv whose every rank reads exactly its own rows (kernel 1, or a patchify
stride that divides the shard) is *proven local* and left untouched; any other
conv over the sharded dim becomes a call to :func:`fxhalo.ops.conv.conv`.

``nn.Conv*d`` with ``padding_mode != 'zeros'`` reaches the graph as
``pad(x, p, mode)`` followed by an unpadded conv.  When such a pad touches the
sharded dim and feeds exactly one conv, the pad's rows along the sharded dim are
folded into that conv's halo (``reflect``/``replicate``/``circular``/``constant``
at the global edges only); what it pads along other dims stays a local pad.  The
pad rule (:mod:`fxhalo.rules.shift`) decides the fold and records a
:class:`PadFold` on the pad node; the conv rule carries it out.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..domain import Domain
from ..geometry import Unsplittable
from ..halo import Edge
from ..ops import conv as conv_ops
from ..sharding import SHARDING, Sharded, example_value, sharding_of, split
from . import Rule, bind, register

PLAN = "fxhalo_conv"
FOLD = "fxhalo_folded_pad"


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...


_CONV_SIG = inspect.signature(_conv_signature)


@dataclasses.dataclass(frozen=True)
class PadFold:
    """An ``F.pad`` along the sharded dim folded into the conv that consumes it."""

    source: object  # the pad's input node
    dim: int
    lo: int
    hi: int
    mode: str
    value: float
    rest: tuple[int, ...]  # the pad spec with the sharded dim's entries zeroed

    @property
    def edge(self) -> Edge:
        return Edge(self.mode, self.value, (self.lo, self.hi))  # F.pad's mode names are edge modes


@dataclasses.dataclass(frozen=True)
class ConvDecision:
    local: bool
    out: Sharded
    kwargs: dict
    fold: PadFold | None
    window: object = None  # the WindowPlan, for reports


class ConvRule(Rule):
    name = "conv"

    def decide(self, node, ctx) -> ConvDecision | None:
        args = bind(_CONV_SIG, node)
        x = args["input"]
        fold = x.meta.get(FOLD) if hasattr(x, "meta") else None
        src = fold.source if fold is not None else x
        for p in ("weight", "bias"):
            if sharding_of(args[p]) is not None:
                ctx.refuse(node, f"takes a sharded tensor as its {p}", f"pass a replicated {p}")
        s = sharding_of(src)
        if s is None:
            return None
        if not s.contiguous:
            ctx.refuse(
                node,
                f"convolves along a dim whose shards are interleaved with another dim ({s})",
                "apply the convolution before the reshape that merged the sharded dim under another dim",
            )
        shape = list(example_value(src).shape)
        shape[s.dim] = s.local
        w_shape = tuple(example_value(args["weight"]).shape)
        nd = len(w_shape) - 2
        axis = s.dim - (len(shape) - nd)
        if axis < 0:
            if s.dim == 0 and len(shape) == nd + 2:  # sharded over the batch: each sample is local
                return ConvDecision(True, s, {}, None)
            ctx.refuse(
                node,
                f"mixes the channels of a tensor sharded along dim {s.dim}",
                "shard a spatial dim (e.g. shard_dim=2) instead of the channel dim",
            )
        domain = Domain(ctx.domain.group_name, ctx.domain.rank, ctx.domain.size, s.dim)
        edge = fold.edge if fold is not None else Edge()
        try:
            _, plan = conv_ops.conv_plan(
                tuple(shape), w_shape, args["stride"], args["padding"], args["dilation"], domain, edge, s.length
            )
        except Unsplittable as e:  # the sizes do not split: say which node, and where
            ctx.refuse(node, e.problem, e.remedy)
        kwargs = dict(
            shard_dim=s.dim,
            group_name=ctx.domain.group_name,
            edge_mode=edge.mode,
            edge_value=edge.value,
            edge_extent=edge.extent or (0, 0),
            length=s.length,
        )
        out = split(s.dim, plan.out_length, ctx.domain)
        return ConvDecision(plan.local and fold is None, out, kwargs, fold, plan)

    def propagate(self, node, ctx):
        decision = self.decide(node, ctx)
        node.meta[PLAN] = decision
        return decision.out if decision is not None else None

    def rewrite(self, node, ctx) -> bool:
        decision = node.meta.get(PLAN)
        if decision is None or decision.local:
            return False
        graph = node.graph
        args = bind(_CONV_SIG, node)
        x = args["input"]
        with graph.inserting_before(node):
            if decision.fold is not None:
                fold = decision.fold
                x = fold.source
                if any(fold.rest):
                    # Pad the other dims first, so halo rows arrive already padded.
                    pad_node = args["input"]
                    value = fold.value if fold.mode == "constant" else None
                    x = graph.call_function(pad_node.target, (x, fold.rest, fold.mode, value))
                    x.meta.update({k: v for k, v in pad_node.meta.items() if k in ("stack_trace", "nn_module_stack")})
                    x.meta[SHARDING] = sharding_of(fold.source)
            new = graph.call_function(
                conv_ops.conv,
                (x, args["weight"], args["bias"], args["stride"], args["padding"], args["dilation"], args["groups"]),
                decision.kwargs,
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if decision.fold is not None and not args["input"].users:
            graph.erase_node(args["input"])
        return True


_CONV = register(ConvRule(), torch.conv1d, torch.conv2d, torch.conv3d)
