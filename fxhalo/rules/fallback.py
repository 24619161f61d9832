"""``fallback="gather"``: what happens to an op that has no rule, or whose rule refused it.

Opt-in only.  The op runs on the all-gathered global tensors (see
:mod:`fxhalo.ops.fallback`); each output that keeps the input's sharded dim at its
global length is re-sharded along it, any other output is replicated.  Every
such node is announced with a warning naming the op, the source line and the
bytes each rank receives per call.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils import _pytree as pytree

from ..errors import describe_node
from ..layout import Sharded, example_value, sharding_of
from ..ops.fallback import make_gather_fallback
from . import Decision, KernelCall, Rule


class GatherFallback(Rule):
    name = "gather fallback"

    def decide(self, node, ctx) -> Decision:
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        gathers, fakes, received = {}, [], 0
        fake_mode = None
        for i, leaf in enumerate(leaves):
            s = sharding_of(leaf)
            val = example_value(leaf) if hasattr(leaf, "meta") else leaf
            if isinstance(s, Sharded):
                if not s.contiguous:
                    ctx.refuse(
                        node,
                        f"would need its sharded argument '{leaf.name}' gathered, but its shards are interleaved ({s})",
                        "apply the op before the reshape that interleaved the shards",
                    )
                gathers[i] = (s.dim, ctx.domain.lengths(s.global_length))
                shape = list(val.shape)
                shape[s.dim] = s.global_length
                fake_mode = val.fake_mode
                received += (s.global_length - s.local) * (val.numel() // max(s.local, 1)) * val.element_size()
                val = ("global", shape, val)
            elif s is not None:
                ctx.refuse(node, "takes a tuple of sharded values", "unpack the tuple first")
            fakes.append(val)
        with fake_mode:
            fakes = [
                torch.empty(v[1], dtype=v[2].dtype, device=v[2].device)
                if isinstance(v, tuple) and v[:1] == ("global",)
                else v
                for v in fakes
            ]
            args, kwargs = pytree.tree_unflatten(fakes, spec)
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)

        first = sharding_of(leaves[min(gathers)])
        outs, out_spec = pytree.tree_flatten(out)
        out_dims, shardings = [], []
        for o in outs:
            keep = isinstance(o, torch.Tensor) and o.ndim > first.dim and o.shape[first.dim] == int(first.global_length)
            out_dims.append(first.dim if keep else None)
            shardings.append(first if keep else None)
        warnings.warn(
            f"fxhalo: {describe_node(node)} has no domain-parallel rule and runs on the all-gathered "
            f"tensor (fallback='gather'): each rank receives {received} bytes per call",
            stacklevel=2,
        )
        fn = make_gather_fallback(
            node.target,
            node.op == "call_method",
            gathers,
            tuple(out_dims),
            group_name=ctx.domain.group_name,
            rank=ctx.domain.rank,
            size=ctx.domain.size,
        )
        return Decision(pytree.tree_unflatten(shardings, out_spec), lambda n: KernelCall(fn, n.args, n.kwargs))


GATHER_FALLBACK = GatherFallback()
