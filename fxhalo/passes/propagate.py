"""Sharding propagation: annotate every node with how its value is laid out.

Inputs follow the input rule: parameters and buffers are replicated; every other
tensor input that has a dim ``shard_dim`` is sharded along it, unless the user
overrides it per argument with ``input_shard_dims``.  Every other node asks its
rule (:mod:`fxhalo.rules`).  A node with no rule that reads a sharded value is
refused: fxhalo never guesses that an unknown op is local.

A partial sum (:class:`~fxhalo.layout.Partial`, what a product that contracts the
sharded dim leaves) stays partial through ops linear in it
(:mod:`fxhalo.rules.partial`); before any other op, and before the graph's outputs,
it is summed (:func:`sum_partials`, one all-reduce).  So the rules themselves only
ever see sharded and replicated inputs.

**Several mesh axes.**  Each axis shards a dim of its own, so a rule is asked once per
axis, inside :func:`~fxhalo.layout.axis_view`, with that axis's one-axis
:class:`~fxhalo.domain.Domain` (:meth:`PassContext.along`): it sees only that axis's
entry of each layout, and decides as it would on a 1-D domain.  :func:`merge_axes`
joins the answers: the layout is one entry per axis; a node that no axis rewrites is
local; a node that one axis rewrites calls that axis's kernel, which treats the other
axes' dims as the local blocks they are; a node that several axes rewrite needs the
same kernel call from each, and a kernel that communicates along several axes at once
(:func:`~fxhalo.domain.several_axes`), else it is refused.  Two axes whose entries
land on one tensor dim (a reshape merging two sharded dims) are kept in the global view
when no axis rewrites the op and the entries nest (:func:`~fxhalo.layout.nesting`), and
an op may read such a dim only if it is local along every axis; anything else raises
:class:`TwoAxesOnOneDim`, on which the global view gathers the inner axes before the
merge (:mod:`fxhalo.passes.localize`), and which plain blocks report as a refusal.
A rule that plans over every axis at once (the FFT's pencil decomposition, where one
axis's move must know the dims the others split) has ``decide_on_mesh(node, ctx)``
instead, asked once with the whole mesh's context.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch

from .. import rules
from ..domain import takes_several_axes
from ..errors import FxHaloError
from ..layout import (
    GLOBAL_VALUE,
    LAYOUT,
    Items,
    Layout,
    Partial,
    Sharded,
    as_layout,
    axis_view,
    example_value,
    layout_of,
    nesting,
    sharding_of,
    shared_dims,
)
from ..ops import moves
from ..rules import DECISION, Decision, OnAxes
from ..rules.fallback import GATHER_FALLBACK
from ..rules.partial import KEEPS_PARTIAL, is_partial, keeps_partial
from .context import PassContext

_STATE_MARKERS = ("._parameters[", "._buffers[")
# Dynamo's name for a value the graph-breaking call left on the stack: its eager result.
_EAGER_RESULT = "___stack"


def input_name(node) -> tuple[str, str]:
    """``(full, root)`` names of a placeholder's source, e.g. ``("batch['x']", "batch")``."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    full = source.name if source is not None else node.name
    full = full() if callable(full) else full
    pretty = re.sub(r"L\['([^']+)'\]", r"\1", full)
    root = re.match(r"[A-Za-z_][A-Za-z0-9_]*", pretty)
    return pretty, root.group(0) if root else pretty


def is_state(node) -> bool:
    """Parameters and buffers (graph inputs Dynamo lifted from modules)."""
    grapharg = node.meta.get("grapharg")
    if isinstance(getattr(grapharg, "example", None), torch.nn.Parameter):
        return True
    full, _ = input_name(node)
    return any(m in full for m in _STATE_MARKERS) or full.startswith(("self.", "G["))


def input_sharding(node, ctx: PassContext) -> Sharded | None:
    val = example_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    if node.name in ctx.known_inputs:  # produced by an earlier graph: keep its layout
        known = ctx.known_inputs[node.name]
        return known.one_axis() if isinstance(known, Layout) else known
    full, root = input_name(node)
    overrides = ctx.input_shard_dims
    # A parameter or buffer of a module Dynamo keeps on its stack across a break
    # (``___stack0._parameters['weight']``) is state, not an eager result.
    if root.startswith(_EAGER_RESULT) and full not in overrides and not is_state(node):
        raise FxHaloError(
            f"graph input '{full}' was computed outside the compiled graphs: Dynamo broke the graph at a "
            "call it could not trace and ran that call eagerly on the local slab, where fxhalo cannot make "
            "it domain-parallel (for example nn.BatchNorm(momentum=None), which reads a tensor as a Python "
            "number). Remedy: find the break with TORCH_LOGS=graph_breaks (or compile with fullgraph=True) "
            "and remove it; if that call really is local, declare its result with "
            f"options={{'input_shard_dims': {{'{full}': dim or None}}}}."
        )
    if full in overrides or root in overrides:
        dim = overrides[full] if full in overrides else overrides[root]
        if dim is None:
            return None
        dim = dim + val.ndim if dim < 0 else dim
    elif is_state(node):
        return None
    else:
        dim = ctx.domain.shard_dim
        dim = dim + val.ndim if dim < 0 else dim
        if not 0 <= dim < val.ndim:
            return None
    local = int(val.shape[dim])  # specialises a symbolic size: the halo plans need numbers
    return Sharded(dim, local, ctx.input_lengths.get(node.name, local * ctx.domain.size))


def _per_axis(axis_ctxs: list[PassContext], decide) -> list:
    """``decide(axis context)`` along each mesh axis, inside that axis's :func:`~fxhalo.layout.axis_view`."""
    out = []
    for axis, along in enumerate(axis_ctxs):
        with axis_view(axis):
            out.append(decide(along))
    return out


def input_layout(node, ctx: PassContext, axis_ctxs: list[PassContext] | None = None):
    """A placeholder's layout: :func:`input_sharding` along each mesh axis (``axis_ctxs``:
    :meth:`PassContext.along_each_axis`, when the caller has it already)."""
    if not ctx.on_mesh:
        return as_layout(input_sharding(node, ctx))

    def sharding(along):  # one rank along an axis holds the whole dim: nothing is split
        return None if along.domain.size == 1 else input_sharding(node, along)

    entries = _per_axis(axis_ctxs or ctx.along_each_axis(), sharding)
    dims = [s.dim for s in entries if isinstance(s, Sharded)]
    if len(set(dims)) != len(dims):
        raise FxHaloError(
            f"graph input '{input_name(node)[0]}' would be sharded along dim {dims[0]} by two mesh axes "
            f"(shard_dim={ctx.mesh.shard_dims}); each mesh axis must shard a dim of its own"
        )
    return Layout(tuple(entries))


def local_input_lengths(gm: torch.fx.GraphModule, ctx: PassContext) -> dict:
    """This rank's local length of every sharded placeholder (before the global lengths are known); on a
    mesh of several axes, a tuple of one local length per axis (``None`` where it is not sharded)."""
    out = {}
    axis_ctxs = ctx.along_each_axis() if ctx.on_mesh else None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            layout = input_layout(node, ctx, axis_ctxs)
            if layout.is_sharded:
                lengths = tuple(s.local if isinstance(s, Sharded) else None for s in layout.axes)
                out[node.name] = lengths if ctx.on_mesh else lengths[0]
    return out


def propagate_sharding(gm: torch.fx.GraphModule, ctx: PassContext, problems: list | None = None) -> int:
    """Decide every node: ``node.meta[DECISION]`` (its rule's :class:`~fxhalo.rules.Decision`) and
    ``node.meta[LAYOUT]`` (its :class:`~fxhalo.layout.Layout`); returns how many values are sharded.

    With a ``problems`` list, a refused node's FxHaloError is appended to it instead
    of raised, and propagation goes on with a best guess for that node's layout (and
    no decision, so the rewrite leaves it alone), so that one pass reports every
    problem (``fxhalo.validate``).
    """
    count = 0
    axis_ctxs = ctx.along_each_axis() if ctx.on_mesh else None  # made once, not per node
    for node in gm.graph.nodes:
        node.meta.pop(DECISION, None)
        if node.op == "placeholder":
            s = input_layout(node, ctx, axis_ctxs)
        elif node.op in ("get_attr", "output"):
            sum_partials(node, ctx)
            s = None
        else:
            try:
                decision = decide_node(node, ctx, axis_ctxs)
            except FxHaloError as e:
                if problems is None:
                    raise
                problems.append((node, e))
                decision = None
            if decision is None:
                s = _best_guess(node)
            else:
                node.meta[DECISION] = decision
                s = decision.out
        layout = as_layout(s, ctx.n_axes)
        node.meta[LAYOUT] = layout
        count += layout.is_sharded
    return count


def decide_node(node, ctx: PassContext, axis_ctxs: list[PassContext] | None) -> Decision:
    """``node``'s decision: its rule's, or on a mesh of several axes (``axis_ctxs``:
    :meth:`PassContext.along_each_axis`) the rule's along each axis, merged (:func:`merge_axes`)."""
    if ctx.on_mesh:
        # A partial sum is summed before any op on a mesh (over the ranks of the axis it is partial along):
        # ops linear in it do not carry it on, as on one axis.
        sum_partials(node, ctx)
        rule = rules.lookup(node)
        if hasattr(rule, "decide_on_mesh"):
            shared = _shared_input(node)
            if shared is not None:  # its plans place each axis on a dim of its own
                raise _gather_before_merge(node, shared, "plans moves over every mesh axis")
            # a rule that plans over every axis at once (the FFT's pencil): asked once, with the mesh
            return _decide(node, ctx, rule.decide_on_mesh)
        try:
            decisions = _per_axis(axis_ctxs, functools.partial(_decide, node))
        except FxHaloError as e:
            shared = _shared_input(node)
            if shared is None or isinstance(e, TwoAxesOnOneDim):
                raise
            # an axis refused to reach along its part of a dim several axes split: gather before the merge
            raise _gather_before_merge(node, shared, f"was refused along one axis ({e})") from e
        return merge_axes(node, ctx, decisions)
    return _decide(node, ctx)


class TwoAxesOnOneDim(FxHaloError):
    """A value two mesh axes would split along one dim (a reshape merging H and W into tokens) that cannot
    stay so: on plain blocks, where the entries do not nest, where the merge itself communicates, or
    where a later op must reach along that dim.  ``axes``: the mesh axes to gather first so that one axis
    is left on each dim, those whose entries there are interleaved (the inner dim of the merge), which the
    global view does before the merge (:mod:`fxhalo.passes.localize`)."""

    def __init__(self, message: str, axes: tuple[int, ...]):
        super().__init__(message)
        self.axes = axes


def _axes_to_gather(entries) -> tuple[int, ...]:
    """For each dim that several entries share: every one of them but the outermost (the fewest blocks
    outside it: a contiguous one, else the least interleaved, as a 1-D window partition leaves it)."""
    out = []
    for dim in {s.dim for s in entries if isinstance(s, Sharded)}:
        on_it = [axis for axis, s in enumerate(entries) if isinstance(s, Sharded) and s.dim == dim]
        keep = min(on_it, key=lambda axis: entries[axis].outer)
        out.extend(axis for axis in on_it if axis != keep)
    return tuple(sorted(out))


def _nest(entries) -> bool:
    """Do the entries that share a dim describe one nested split of it (:func:`~fxhalo.layout.nesting`)?"""
    layout = Layout(tuple(entries))
    return all(nesting(layout, dim) is not None for dim in shared_dims(layout))


def _shared_input(node):
    """The first input of ``node`` with a dim several mesh axes split, or ``None``."""
    return next((a for a in node.all_input_nodes if shared_dims(layout_of(a))), None)


def _gather_before_merge(node, shared, why: str) -> TwoAxesOnOneDim:
    """``node`` cannot read its input ``shared`` where several axes split one dim: the inner ones gather."""
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return TwoAxesOnOneDim(
        f"node '{node.name}' ({op}) {why} along a dim that several mesh axes split ('{shared.name}': "
        f"{layout_of(shared)})",
        _axes_to_gather(layout_of(shared).axes),
    )


def merge_axes(node, ctx: PassContext, decisions: list[Decision]) -> Decision:
    """One decision from one per mesh axis (see the module docstring)."""
    outs = [d.out for d in decisions]
    items = next((len(o) for o in outs if isinstance(o, tuple)), None)
    if items is not None:  # a tuple (chunk, split): an axis that splits no input answers None for all items
        outs = [(None,) * items if o is None else o for o in outs]
        out = Items(Layout(tuple(o[i] for o in outs)) for i in range(items))
        per_value = [[o[i] for o in outs] for i in range(items)]
    else:
        out = Layout(tuple(outs))
        per_value = [outs]
    rewriting = [(axis, d) for axis, d in enumerate(decisions) if d.rewrites]
    shared = _shared_input(node)
    if shared is not None and rewriting:
        # Only ops local along every axis read a dim several axes split (a pointwise op, a batched one,
        # the reshape that splits it back): each axis's view is then true of the whole.  An op that reaches
        # along such a dim gathers the inner axes, before the merge (fxhalo.passes.localize).
        raise _gather_before_merge(node, shared, "needs communication")
    for entries in per_value:
        dims = [s.dim for s in entries if isinstance(s, Sharded)]
        if len(set(dims)) != len(dims):
            if ctx.global_view and not rewriting and _nest(entries):
                continue  # a dim split by several axes, each axis's entry true in its view (layout.nesting)
            try:
                ctx.refuse(
                    node,
                    "gives a value that two mesh axes would shard along one dim ("
                    + ", ".join(str(s) for s in entries)
                    + "): it merges or moves sharded dims together",
                    "keep the dims that different mesh axes shard apart (reshape only dims no axis shards), "
                    "pass DomainTensors (the global view gathers the inner dim first), or shard one dim only "
                    "(a one-axis group)",
                )
            except FxHaloError as e:
                raise TwoAxesOnOneDim(str(e), _axes_to_gather(entries)) from None
    if not rewriting:
        return Decision(out, rule=decisions[0].rule)
    call = rewriting[0][1].call
    if len(rewriting) > 1:
        # Built here only to compare them; the rewrite builds the call again from the node's arguments then.
        calls = [d.call(node) for _, d in rewriting]
        first = calls[0]
        same = all(c.kernel is first.kernel and c.args == first.args and c.kwargs == first.kwargs for c in calls)
        if not same:  # a rule whose axes chose different calls may know one that does them all (adaptive pools)
            combined = getattr(decisions[0].rule, "combined_call", lambda node, calls: None)
            call = combined(node, calls)
        if call is None or (same and not takes_several_axes(first.kernel, first.args, first.kwargs)):
            ctx.refuse(
                node,
                f"needs communication along {len(rewriting)} mesh axes at once, which fxhalo does not do for "
                "this op yet",
                "shard only one of the dims this op reaches across (a one-axis group for this part of the "
                "model), or gather it with fxhalo.gather() outside the compiled region",
            )
    layout = OnAxes(
        tuple((ctx.mesh.axes[axis], d.layout) for axis, d in rewriting), tuple(d.plan for _, d in rewriting)
    )
    first = rewriting[0][1]
    return Decision(out, call, layout, first.plan, rule=first.rule)


def _best_guess(node):
    """After a refusal: the first sharded input's layout, for each output (a tuple's items too, such as a
    sort's values and indices) that looks like it, so the ops after it are still checked."""
    out = example_value(node)
    a = next((a for a in node.all_input_nodes if isinstance(layout_of(a), Layout) and layout_of(a).is_sharded), None)
    if a is None:
        return None
    layout, ndim = layout_of(a), example_value(a).ndim

    def like(v):
        return layout if isinstance(v, torch.Tensor) and v.ndim == ndim else None

    return tuple(like(v) for v in out) if isinstance(out, (tuple, list)) else like(out)


def sum_partials(node, ctx: PassContext) -> None:
    """Before ``node``: each partial sum it reads becomes its total (one all-reduce,
    :func:`fxhalo.ops.moves.sum_partial`), replicated along the axis it was partial along.  On a mesh,
    one all-reduce over each such axis's ranks; the value's entries on the other axes stay."""
    for a in list(node.all_input_nodes):
        if not is_partial(a):
            continue
        total, entries = a, list(layout_of(a).axes)
        for axis, entry in enumerate(entries):
            if not isinstance(entry, Partial):
                continue
            domain = ctx.mesh.axes[axis] if ctx.on_mesh else ctx.domain
            with node.graph.inserting_before(node):
                total = node.graph.call_function(moves.sum_partial, (total,), {"axes": domain.kernel_axes(0)})
            for key in ("example_value", "val", GLOBAL_VALUE):  # the same shape: the sum of the summands
                if key in a.meta:
                    total.meta[key] = a.meta[key]
            if "stack_trace" in node.meta:  # reports name the op that needed the sum
                total.meta["stack_trace"] = node.meta["stack_trace"]
            entries[axis] = None
            total.meta[LAYOUT] = Layout(tuple(entries))
        node.replace_input_with(a, total)


def _decide(node, ctx: PassContext, decide=None) -> Decision:
    """The rule's decision for ``node`` (``decide(node, ctx)`` instead of the rule's own, when given), with
    partial sums summed first (or kept, by ops linear in them) and the gather fallback on refusal."""
    if any(is_partial(a) for a in node.all_input_nodes):
        if keeps_partial(node):
            return dataclasses.replace(KEEPS_PARTIAL(node, ctx), rule=KEEPS_PARTIAL)
        sum_partials(node, ctx)
    rule = rules.lookup(node)
    sharded = [a for a in node.all_input_nodes if getattr(layout_of(a), "is_sharded", False)]
    try:
        if rule is None:
            if sharded:
                ctx.refuse(
                    node,
                    f"reads '{sharded[0].name}', which is sharded ({sharding_of(sharded[0])}), "
                    "and fxhalo has no rule for this op",
                    "use options={'fallback': 'gather'} to run it on the gathered tensor, run it outside "
                    "the compiled region on fxhalo.gather()ed tensors, or mark the input replicated with "
                    "options={'input_shard_dims': {name: None}} if it really is",
                )
            return Decision()
        return dataclasses.replace((decide or rule)(node, ctx), rule=rule)
    except FxHaloError:
        if ctx.fallback != "gather" or not sharded or node.op not in ("call_function", "call_method"):
            raise
    return dataclasses.replace(GATHER_FALLBACK(node, ctx), rule=GATHER_FALLBACK)
