"""Gradient conventions at the graph's edges (see :mod:`fxhalo.ops.grad`).

Before::

    loss = fxhalo_mean(...)          # replicated
    return (loss, y)

After::

    loss = fxhalo_mean(...)
    loss_1 = fxhalo.ops.grad.replicated_output(loss, group_name='0', size=4)
    return (loss_1, y)

and likewise ``replicated_input`` after each replicated activation input that
requires grad.  Parameters and buffers are left alone: their gradients stay
partial (sum them over the group).
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ..ops import grad as grad_ops
from ..sharding import SHARDING, example_value
from .context import PassContext
from .sharding import is_state


def _needs_grad(node) -> bool:
    val = example_value(node)
    return isinstance(val, torch.Tensor) and val.requires_grad


def wrap_replicated_boundaries(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    graph, changed = gm.graph, 0
    group = ctx.domain.group_name
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.meta.get(SHARDING) is not None:
            continue
        if is_state(node) or not _needs_grad(node) or not node.users:
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            new = graph.call_function(grad_ops.replicated_input, (node,), {"group_name": group})
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", SHARDING)})
        for user in users:
            user.replace_input_with(node, new)
        changed += 1

    output = next(n for n in graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    new_leaves = []
    for leaf in leaves:
        if isinstance(leaf, torch.fx.Node) and leaf.meta.get(SHARDING) is None and _needs_grad(leaf):
            with graph.inserting_before(output):
                wrapped = graph.call_function(grad_ops.replicated_output, (leaf,),
                                              {"group_name": group, "size": ctx.domain.size})
            wrapped.meta.update({k: v for k, v in leaf.meta.items() if k in ("val", "example_value", SHARDING)})
            new_leaves.append(wrapped)
            changed += 1
        else:
            new_leaves.append(leaf)
    output.args = (pytree.tree_unflatten(new_leaves, spec),)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
