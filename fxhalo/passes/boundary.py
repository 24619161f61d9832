"""Gradient conventions at the graph's edges (see :mod:`fxhalo.ops.grad`).

Before::

    loss = fxhalo_mean(...)          # replicated
    return (loss, y)

After::

    loss = fxhalo_mean(...)
    loss_1 = fxhalo.ops.grad.replicated_output(loss, group_name='0', size=4)
    return (loss_1, y)

and likewise ``replicated_input`` after each replicated activation input that
requires grad.  On a mesh, a value sharded along some axes and whole along another
(a zonal mean: sharded along H, whole along W) is replicated over that axis's ranks,
and gets the same treatment over that axis's group.  With ``grad_sync`` (the default) the parameters that require grad
are read through :func:`fxhalo.ops.grad.synced_params`, in buckets of at most
:data:`BUCKET_BYTES` of one dtype, so that their gradients leave the backward
summed over the domain group: one all_reduce per bucket.  Buckets are filled
from the parameters the forward reads last, whose gradients the backward
produces first, so the first bucket's all_reduce can start early.  Without
``grad_sync`` their gradients stay partial (sum them over the group).
"""

from __future__ import annotations

import operator

import torch
from torch.utils import _pytree as pytree

from ..errors import FxHaloError
from ..layout import LAYOUT, Layout, example_value, layout_of
from ..ops import grad as grad_ops
from .context import PassContext
from .propagate import is_state


def _sharded(node) -> bool:
    """Sharded along some mesh axis (partial sums were summed before the outputs)."""
    layout = layout_of(node)
    return layout is not None and layout.is_sharded


def _needs_grad(node) -> bool:
    val = example_value(node)
    return isinstance(val, torch.Tensor) and val.requires_grad


#: the most gradient bytes one grad_sync all_reduce carries
BUCKET_BYTES = 25 * 2**20


def _buckets(params: list) -> list[list]:
    """Parameters in buckets of one dtype and at most BUCKET_BYTES, last-read parameters first."""
    order = {n: i for i, n in enumerate(params[0].graph.nodes)} if params else {}
    first_use = {p: min(order[u] for u in p.users) for p in params}
    buckets: dict = {}
    out = []
    for p in sorted(params, key=lambda p: -first_use[p]):
        val = example_value(p)
        size = val.numel() * val.element_size()
        current = buckets.get(val.dtype)
        if current is None or (current[1] + size > BUCKET_BYTES and current[0]):
            current = buckets[val.dtype] = [[], 0]
            out.append(current[0])
        current[0].append(p)
        current[1] += size
    return out


def sync_parameter_grads(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Read every parameter that requires grad through :func:`~fxhalo.ops.grad.synced_params`; returns buckets."""
    graph = gm.graph
    params = [
        n
        for n in graph.nodes
        if n.op == "placeholder" and not _sharded(n) and is_state(n) and _needs_grad(n) and n.users
    ]
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1] if params else None
    buckets = _buckets(params)
    for bucket in buckets:
        users = {p: list(p.users) for p in bucket}
        with graph.inserting_after(last_input):
            synced = graph.call_function(grad_ops.synced_params, tuple(bucket), {"group_name": ctx.domain.group_name})
        synced.meta["val"] = tuple(example_value(p) for p in bucket)
        for i, p in enumerate(bucket):
            with graph.inserting_after(synced):
                item = graph.call_function(operator.getitem, (synced, i))
            item.meta["val"] = example_value(p)
            for user in users[p]:
                user.replace_input_with(p, item)
    return len(buckets)


def _copies(node, ctx: PassContext) -> tuple[str, int] | None:
    """``(group, ranks)`` of the ranks that hold the same copy of ``node``'s value: the whole domain for a
    replicated value; on a mesh, for a value sharded along some axes only, the ranks of the others (the
    group of the one such axis; two of three is refused).  ``None`` for a value no two ranks share."""
    layout = layout_of(node)
    if not _sharded(node):
        return ctx.domain.group_name, ctx.domain.size
    if not ctx.on_mesh or not isinstance(layout, Layout):
        return None
    whole = [axis for axis, e in zip(ctx.mesh.axes, layout.axes) if e is None and axis.size > 1]
    if not whole:
        return None
    if len(whole) > 1:
        raise FxHaloError(
            f"graph input or output '{node.name}' is sharded along one axis of a 3-D mesh and whole along two "
            "(its gradient would be summed over a group fxhalo does not make). Remedy: shard it along every "
            "axis, or along none"
        )
    return whole[0].group_name, whole[0].size


def wrap_replicated_boundaries(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    graph, changed = gm.graph, 0
    if ctx.grad_sync:
        changed += sync_parameter_grads(gm, ctx)
    for node in list(graph.nodes):
        if node.op != "placeholder" or is_state(node) or not _needs_grad(node) or not node.users:
            continue
        copies = _copies(node, ctx)
        if copies is None:
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            new = graph.call_function(grad_ops.replicated_input, (node,), {"group_name": copies[0]})
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", LAYOUT)})
        for user in users:
            user.replace_input_with(node, new)
        changed += 1

    output = next(n for n in graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    new_leaves = []
    for leaf in leaves:
        copies = _copies(leaf, ctx) if isinstance(leaf, torch.fx.Node) and _needs_grad(leaf) else None
        if copies is not None:
            with graph.inserting_before(output):
                wrapped = graph.call_function(
                    grad_ops.replicated_output, (leaf,), {"group_name": copies[0], "size": copies[1]}
                )
            wrapped.meta.update({k: v for k, v in leaf.meta.items() if k in ("val", "example_value", LAYOUT)})
            new_leaves.append(wrapped)
            changed += 1
        else:
            new_leaves.append(leaf)
    output.args = (pytree.tree_unflatten(new_leaves, spec),)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
