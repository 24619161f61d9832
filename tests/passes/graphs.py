"""Helpers for pass tests: real Dynamo graphs, passes run in one process on a simulated domain."""

import torch
import torch.nn as nn

from fxhalo import Domain, FxHaloError
from fxhalo.passes import PassContext, propagate_sharding, rewrite
from fxhalo.passes.fuse import fold_pads


def passes_on(model, *inputs, size=4, shard_dim=2, **overrides):
    """Run propagation, rewrite and the pad fold on Dynamo's graph of ``model``; ``(gm, nodes changed)``.

    A folded ``pad -> conv`` counts as one changed node (the pad's rows become the
    conv's halo), as the user's graph has one op that communicates there.

    The passes run inside the backend, as in fxhalo's own backend: Dynamo drops the
    placeholders' source information from ``node.meta`` once the backend returns.
    """
    out = {}

    def capture(gm, example_inputs):
        # A module generated from the graph as it is now: it keeps running the unrewritten
        # code (which needs no process group) after the passes edit the graph.
        original = torch.fx.GraphModule(gm, gm.graph)
        ctx = PassContext(Domain("sim", 1, size, shard_dim), overrides)
        try:
            propagate_sharding(gm, ctx)
            out["changed"] = rewrite(gm, ctx) - fold_pads(gm, ctx)
            gm.graph.lint()
        except FxHaloError as e:
            out["error"] = e
        out["gm"] = gm
        return original

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(*inputs)
    if "error" in out:
        raise out["error"]
    return out["gm"], out["changed"]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class Lambda(nn.Module):
    """A module around a function, so that Dynamo sees its inputs as forward arguments (``xs[i]``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)
