"""The global view: decide every node of a graph traced at *global* shapes, and make it a local program.

When a model is called on :class:`~fxhalo.DomainTensor` inputs, Dynamo traces the
global program: every node's example value has the global shape, and shapes the
user's code read from ``x.shape`` are global constants in the graph.  This pass
replaces :func:`~fxhalo.passes.propagate.propagate_sharding` for such a graph.  It
walks the nodes in order and, for each one,

1. keeps the global example value under ``node.meta[GLOBAL_VALUE]``;
2. turns global sizes in its arguments into local ones where the op takes a shape
   (``view``/``reshape``/``unflatten``/``expand``/``broadcast_to`` of a sharded
   tensor): the output dim that holds the shard gets this rank's length;
3. aligns the operands of an elementwise op or a ``cat``: a *replicated* operand that
   spans the sharded dim (a positional grid built from ``x.shape``, a latitude
   weight) is sliced to this rank's rows (:func:`fxhalo.ops.moves.own_rows`; no
   communication), a *partial sum* that spans it (a token-mixing product) is
   reduce-scattered to them (:func:`fxhalo.ops.moves.scatter_partial`), and a sharded
   operand split another way than the largest one (an upsampled tensor meeting a skip
   connection with another partition) has its rows moved
   (:func:`fxhalo.ops.moves.repartition`, one exchange of the rows that change rank);
4. asks the node's rule for its decision, exactly as the plain path does, with the
   node's inputs already local;
5. where the rule finds the sharded dim too short for every rank to hold a row (a
   UNet's bottleneck on many ranks), gathers the node's sharded inputs
   (:func:`fxhalo.ops.moves.all_rows`, one all-gather of a small tensor) and computes
   the node replicated.  The replicated result is sharded again (a free slice, by the
   balanced rule) as soon as an op makes that dim long enough for every rank to hold a
   row, or where step 3 meets it with a sharded tensor;
6. gives the node its *local* example value: the global shape with each sharded dim
   at this rank's length.

After this pass the graph looks exactly like one Dynamo traced on the local slabs,
with a layout and a decision on every node, and the rest of the pipeline (rewrite,
fusions, boundaries, meta refresh) runs unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
import operator

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .. import rules
from ..errors import FxHaloError
from ..geometry import TooShort
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
    is_tensor_node,
    layout_of,
    sharding_of,
    shared_dims,
    split_axes,
    whole_entry,
)
from ..layout import split as layout_split
from ..ops import moves
from ..rules import DECISION
from ..rules.local import Elementwise
from ..rules.norm import Norm
from ..rules.shape import Cat, assigned_dim, reshape_sharding
from .context import PassContext

__all__ = ["GLOBAL_VALUE", "localize", "global_shape"]


_RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}
_UNFLATTENS = {("call_method", "unflatten"), ("call_function", torch.unflatten)}
_EXPANDS = {("call_method", "expand"), ("call_function", torch.broadcast_to)}


def global_shape(node) -> tuple[int, ...] | None:
    val = node.meta.get(GLOBAL_VALUE, example_value(node))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def localize(gm: torch.fx.GraphModule, ctx: PassContext, problems: list | None = None) -> int:
    """Decide and localize every node of the global graph ``gm`` in place; returns how many values are sharded.

    On a mesh, a reshape that merges dims different axes split keeps each axis on the merged dim
    (:mod:`fxhalo.layout`, "one dim split by several axes"), so the ops after it run on this rank's part
    only.  Where a later op must reach along that dim (attention over the tokens, a graph output), the
    walk starts again from the traced graph with the merge gathering its inner axes first.
    """
    pristine = _copy_graph(gm.graph) if ctx.on_mesh else None
    gather_first: set[str] = set()
    while True:
        found = [] if problems is not None else None
        try:
            count = _localize_walk(gm, ctx, found, gather_first)
        except _MergeTooEarly as e:
            if not e.merges - gather_first:  # cannot happen: each retry gathers at one more merge
                raise FxHaloError(f"{e.__cause__}") from None
            gather_first |= e.merges
            gm.graph = _copy_graph(pristine)
            continue
        if problems is not None:
            problems.extend(found)
        return count


def _localize_walk(gm, ctx: PassContext, problems, gather_first: set[str]) -> int:
    from . import propagate

    mode = _fake_mode(gm)
    axis_ctxs = ctx.along_each_axis() if ctx.on_mesh else None  # made once, not per node
    count = 0
    for node in list(gm.graph.nodes):
        node.meta.pop(DECISION, None)
        if node.op == "placeholder":
            out = _input_layout(node, ctx)
        elif node.op in ("get_attr", "output"):
            _merged_too_early(node.all_input_nodes, "is a graph output")
            propagate.sum_partials(node, ctx)
            out = None
        else:
            node.meta[GLOBAL_VALUE] = example_value(node)
            _set_value(node, _plain(example_value(node)))
            try:
                out = _decide(node, ctx, mode, axis_ctxs, gather_first)
            except FxHaloError as e:
                if problems is None:
                    raise
                problems.append((node, e))
                out = propagate._best_guess(node)
            _set_value(node, _local_value(node, out, mode))
        layout = as_layout(out, ctx.n_axes)
        node.meta[LAYOUT] = layout
        _note_merge(node, layout)
        count += layout.is_sharded
        if node.op in ("call_function", "call_method") and not layout.is_sharded:
            count += _shard_again_where_it_grows(node, ctx, mode)
        if node.op in ("call_function", "call_method") and ctx.on_mesh:
            _shard_again_after_merge(node, ctx, mode)
    return count


def _decide(node, ctx, mode, axis_ctxs, gather_first: set[str]):
    from .propagate import TwoAxesOnOneDim, _axes_to_gather, decide_node, sum_partials

    _localize_shape_args(node, ctx, mode)
    if ctx.on_mesh:
        sum_partials(node, ctx)  # before the operands are aligned (decide_node would, after them)
        _align_operands_on_mesh(node, ctx, mode)
    else:
        _align_operands(node, ctx, mode)
    _shard_assigned_target(node, ctx, mode)
    _set_value(node, _run_fake(node, mode, fallback=example_value(node)))
    try:
        decision = decide_node(node, ctx, axis_ctxs)
        out = as_layout(decision.out, ctx.n_axes)
        if node.name in gather_first and isinstance(out, Layout) and shared_dims(out):
            raise TwoAxesOnOneDim(f"node '{node.name}' merges dims several mesh axes split", _axes_to_gather(out.axes))
    except TwoAxesOnOneDim as e:
        _merged_too_early(node.all_input_nodes, str(e))
        # A reshape merging dims that two axes split (H and W into tokens): the inner dim's axis gathers
        # its rows first, so the merged dim is split by the outer dim's axis alone, contiguously.
        _gather_sharded_inputs(node, ctx, mode, e.axes)
        for a in node.all_input_nodes:  # sliced again where the merge is undone (_shard_again_after_merge)
            if GATHERED in a.meta:
                shape = global_shape(a)
                a.meta[MERGED] = tuple((axis, dim, len(shape), shape[dim]) for axis, dim in a.meta.pop(GATHERED))
        if (node.op, node.target) == ("call_method", "view"):  # the gathered rows need not be contiguous
            node.target = "reshape"
        if (node.op, node.target) in _RESHAPES:  # localized again below from the global sizes, per axis left
            shape = global_shape(node)
            node.args = (node.args[0], *shape) if node.op == "call_method" else (node.args[0], tuple(shape))
            node.kwargs = {}
        _localize_shape_args(node, ctx, mode)  # again: the gathered dims are whole now
        _set_value(node, _run_fake(node, mode, fallback=_plain(node.meta[GLOBAL_VALUE])))
        decision = decide_node(node, ctx, axis_ctxs)
    except FxHaloError as e:
        if not isinstance(e, TooShort) and not isinstance(e.__context__, TooShort):
            raise
        _gather_sharded_inputs(node, ctx, mode)
        _set_value(node, _run_fake(node, mode, fallback=_plain(node.meta[GLOBAL_VALUE])))
        decision = decide_node(node, ctx, axis_ctxs)
    node.meta[DECISION] = decision
    return decision.out


# -- a dim several axes split -----------------------------------------------------------------

#: node.meta key: the names of the nodes that merged the dims several mesh axes split in this value
MERGED_AT = "fxhalo_merged_at"


class _MergeTooEarly(Exception):
    """An op (or a graph output) must reach along a dim that several axes split: :func:`localize` walks
    again, with ``merges`` gathering their inner axes first."""

    def __init__(self, merges: set[str]):
        super().__init__(f"gather first at {sorted(merges)}")
        self.merges = merges


def _has_shared_dim(layout) -> bool:
    """Has the value (or an item of a tuple, such as ``chunk``'s) a dim several axes split?"""
    items = layout if isinstance(layout, Items) else (layout,)
    return any(isinstance(item, Layout) and shared_dims(item) for item in items)


def _note_merge(node, layout) -> None:
    """``MERGED_AT`` of a value with a dim several axes split: its inputs' merges, or itself when it made
    that dim."""
    if _has_shared_dim(layout):
        inherited = set().union(*(a.meta.get(MERGED_AT, set()) for a in node.all_input_nodes))
        node.meta[MERGED_AT] = inherited or {node.name}


def _merged_too_early(inputs, why: str) -> None:
    """Raise :class:`_MergeTooEarly` when one of ``inputs`` has a dim several axes split."""
    merges = set().union(*(a.meta.get(MERGED_AT, set()) for a in inputs if _has_shared_dim(layout_of(a))))
    if merges:
        raise _MergeTooEarly(merges) from FxHaloError(why)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph``, nodes of the same names with shallow copies of their meta (the walk replaces
    meta entries, it does not change them in place)."""
    new = torch.fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    new._codegen = copy.deepcopy(graph._codegen)
    copies: dict = {}
    rv, output = new.graph_copy(graph, copies, return_output_node=True)
    new.output(rv, type_expr=output.type).meta = copy.copy(output.meta)
    for old, node in copies.items():  # what Dynamo set on the nodes themselves (a placeholder's source)
        for key, value in vars(old).items():
            if key not in vars(node):
                setattr(node, key, value)
    return new


# -- inputs --------------------------------------------------------------------------------


def _input_layout(node, ctx: PassContext):
    from ..tensor import DomainTensor

    val = example_value(node)
    if not isinstance(val, DomainTensor):
        return None  # parameters, buffers and plain tensors: replicated, as the user passed them whole
    spec = val.spec
    mode = _fake_mode(node.graph.owning_module)
    if ctx.on_mesh:  # the backend checked that every input is split over this mesh
        node.meta[GLOBAL_VALUE] = val
        out = Layout(
            tuple(
                None if a is None else Sharded(a.dim, a.lengths[axis.rank], a.length())
                for a, axis in zip(spec.axes, ctx.mesh.axes)
            )
        )
        _set_value(node, _localized(val, val._local, out, mode))
        return out
    if spec.group_name != ctx.domain.group_name or len(spec.lengths) != ctx.domain.size:
        raise FxHaloError(
            f"graph input '{node.name}' is a DomainTensor over group {spec.group_name!r} "
            f"({len(spec.lengths)} ranks), but the model was compiled for group {ctx.domain.group_name!r} "
            f"({ctx.domain.size} ranks). Remedy: make the input with fxhalo.from_local(..., group=...) on the "
            "group the backend uses (options={'group': ...})."
        )
    node.meta[GLOBAL_VALUE] = val
    out = Sharded(spec.dim, spec.lengths[ctx.domain.rank], spec.length())
    # Dynamo fakes a DomainTensor that has a grad_fn through an op on it, which yields a global-shaped
    # inner value; the local value follows from the spec either way.
    # (fxhalo.explain's slabs are meta tensors standing for tensors on the DomainTensor's device)
    _set_value(node, _localized(val, val._local, Layout((out,)), mode))
    return out


# -- step 2: shape arguments ------------------------------------------------------------------


def _localize_shape_args(node, ctx, mode) -> None:
    key = (node.op, node.target)
    if key not in _RESHAPES | _UNFLATTENS | _EXPANDS or not node.args:
        return
    src = node.args[0]
    layout = layout_of(src)
    g_in, g_out = global_shape(src), global_shape(node)
    entries = split_axes(layout)
    if not entries or g_in is None or g_out is None:
        return
    local_out = list(g_out)
    for axis, s in entries:  # each mesh axis's sharded dim, in turn
        n = int(s.global_length)
        if key in _EXPANDS:
            local_out[s.dim + len(g_out) - len(g_in)] = s.local
            continue
        whole = reshape_sharding(list(g_in), list(g_out), whole_entry(layout, axis))
        if not ctx.on_mesh and not isinstance(whole, str) and _straddles(s, g_out[whole.dim], ctx):
            s = _regroup_for_split(node, src, s, g_out[whole.dim], ctx, mode)
            src = node.args[0]
            whole = reshape_sharding(list(g_in), list(g_out), Sharded(s.dim, n, n, s.outer))
        # Two axes whose dims merge into one (H and W into tokens) each scale it: the product of their shares.
        if isinstance(whole, str) or (local_out[whole.dim] * s.local) % n:
            return  # the reshape rule refuses it, with the local sizes
        local_out[whole.dim] = local_out[whole.dim] * s.local // n
    if key in _UNFLATTENS:  # its sizes are a sub-shape: a reshape to the whole local shape says the same
        node.op, node.target = "call_method", "reshape"
    if node.op == "call_method":
        node.args, node.kwargs = (src, *local_out), {}
    else:
        node.args, node.kwargs = (src, tuple(local_out)), {}


def _straddles(s: Sharded, outer: int, ctx) -> bool:
    """A reshape splits the sharded dim into ``outer`` blocks (and the rows inside each), and some rank's
    rows cross a block's edge: no layout of the split holds them (long-range windows, ``(l1 h)`` with the
    window's rows ``l1`` outside, on more ranks than windows rows)."""
    n = int(s.global_length)
    if not s.contiguous or outer <= 1 or outer >= n or n % outer:
        return False
    block = n // outer
    return block >= ctx.domain.size and any(a % block or b % block for a, b in ctx.domain.partition(s.global_length))


def _regroup_for_split(node, src, s: Sharded, outer: int, ctx, mode) -> Sharded:
    """Before such a reshape: the rows regrouped so that each rank holds the same slice of every block
    (:func:`fxhalo.ops.moves.regroup`, one all_to_all_single); the split then puts the shard on the rows
    inside the blocks.  Returns the new (interleaved) layout of ``node``'s input."""
    n = int(s.global_length)
    block = n // outer
    a, b = ctx.domain.partition(block)[ctx.domain.rank]
    layout = Sharded(s.dim, outer * (b - a), n, outer)
    plan = moves.regroup_plan(_block_rows(s, ctx), _interleaved_rows(layout, ctx), ctx.domain.rank)
    axes = ctx.domain.kernel_axes(s.dim, s.global_length)
    node.replace_input_with(src, _insert_move(node, src, moves.regroup, (src, *plan), axes, layout, mode))
    return layout


# -- step 3: operands that disagree on the sharded dim -----------------------------------------


def _operands_to_align(node) -> tuple:
    """``(the operand the others follow, or None for the largest sharded one; the operands)``: every tensor
    operand of an elementwise op or a ``cat``; the affine weight and bias of a layer or RMS norm, which have
    the normalised (global) shape and follow the input (``nn.LayerNorm([C, H, W])``: each rank applies
    its rows of them)."""
    rule = rules.lookup(node)
    if isinstance(rule, (Elementwise, Cat)):
        return None, [a for a in node.all_input_nodes if is_tensor_node(a)]
    if isinstance(rule, Norm) and rule.affine_normalized:
        args = rule.bound(node)
        return args["input"], [args[p] for p in ("weight", "bias") if is_tensor_node(args.get(p))]
    return None, []


def _align_operands(node, ctx, mode) -> None:
    """Before an elementwise op, a ``cat`` or a layer norm's affine terms: every operand that spans the
    sharded dim takes the partition of the largest sharded operand, a contiguous one first (a replicated
    one is sliced, a sharded one split another way has its rows moved, one sharded along another dim has
    its shard moved, an interleaved one is regrouped)."""
    target_node, inputs = _operands_to_align(node)
    sharded = [a for a in inputs if isinstance(sharding_of(a), Sharded)]
    if target_node is None and sharded:
        target_node = max(sharded, key=lambda a: (math.prod(global_shape(a)), sharding_of(a).contiguous))
    if not inputs or not isinstance(sharding_of(target_node), Sharded):
        return
    t = sharding_of(target_node)
    if not t.contiguous:
        return
    pos = t.dim - len(global_shape(target_node))  # broadcasting aligns dims from the right
    n = int(t.global_length)
    want = _lengths(t, ctx)
    for a in inputs:
        shape, s = global_shape(a), sharding_of(a)
        if shape is None or len(shape) < -pos or shape[pos] != n or n == 1:
            continue
        dim = len(shape) + pos
        if s is None:
            kernel, args, axes = moves.own_rows, (a,), ctx.domain.kernel_axes(dim, t.global_length)
        elif isinstance(s, Partial):  # a partial sum meets sharded rows: each rank sums only its own
            kernel, args, axes = moves.scatter_partial, (a,), ctx.domain.kernel_axes(dim, t.global_length)
        elif isinstance(s, Sharded) and s.dim == dim and s.contiguous and _lengths(s, ctx) != want:
            kernel, args, axes = moves.repartition, (a, want), ctx.domain.kernel_axes(dim, s.global_length)
        elif isinstance(s, Sharded) and s.dim != dim and s.contiguous:  # sharded along another dim: move it
            kernel, args, axes = moves.move_shard, (a, dim, want), ctx.domain.kernel_axes(s.dim, s.global_length)
        elif isinstance(s, Sharded) and s.dim == dim and not s.contiguous and int(s.global_length) == n:
            if s.lengths is not None:
                continue  # slices split by an explicit partition: _interleaved_rows assumes the balanced one
            # interleaved (each rank a slice of every window): the rows regrouped into t's blocks
            plan = moves.regroup_plan(_interleaved_rows(s, ctx), _block_rows(t, ctx), ctx.domain.rank)
            kernel, args, axes = moves.regroup, (a, *plan), ctx.domain.kernel_axes(dim, s.global_length)
        else:
            continue
        layout = Sharded(dim, t.local, t.global_length)
        node.replace_input_with(a, _insert_move(node, a, kernel, args, axes, layout, mode))


def _align_operands_on_mesh(node, ctx, mode) -> None:
    """:func:`_align_operands` on a mesh of several axes, each axis on its own: along an axis, every
    operand follows the largest one that axis shards (contiguously); a replicated operand that spans that
    dim is sliced to this rank's rows (``own_rows`` along the axis), and one whose rows are split another
    way along it has them moved (``repartition`` along the axis: the other axes' dims are local blocks to
    it); an operand the axis shards along another dim is refused (no moves of the shard between dims on a
    mesh yet)."""
    target_node, inputs = _operands_to_align(node)
    if any(shared_dims(layout_of(a)) for a in inputs):
        _check_alike_on_shared_dims(node, inputs)
        return
    moved = {a: a for a in inputs}
    for axis, along in enumerate(ctx.mesh.axes):

        def entry(a, axis=axis):
            layout = layout_of(moved.get(a, a))  # a norm's input leads, and is not moved
            return layout.axes[axis] if isinstance(layout, Layout) else None

        lead = target_node
        if lead is None:
            candidates = [a for a in inputs if isinstance(entry(a), Sharded) and entry(a).contiguous]
            lead = max(candidates, key=lambda a: math.prod(global_shape(a)), default=None)
        t = entry(lead) if lead is not None else None
        if not isinstance(t, Sharded) or not t.contiguous:
            continue
        t_shape = global_shape(lead)
        pos = t.dim - len(t_shape)  # broadcasting aligns dims from the right
        for a in inputs:
            shape = global_shape(a)
            if a is lead or shape is None or len(shape) < -pos or shape[pos] != int(t.global_length):
                continue
            dim, e = len(shape) + pos, entry(a)
            if _split_alike(e, t, dim, along):
                continue
            layout = layout_of(moved[a])
            entries = list(layout.axes) if isinstance(layout, Layout) else [None] * len(ctx.mesh.axes)
            entries[axis] = Sharded(dim, t.local, t.global_length)
            if e is None and int(t.global_length) > 1:
                axes = along.kernel_axes(dim, t.global_length)
                moved[a] = _insert_move(node, moved[a], moves.own_rows, (moved[a],), axes, Layout(tuple(entries)), mode)
            elif _split_alike(e, t, dim, along, lengths=False):  # the same dim, other lengths
                want, axes = along.lengths(t.global_length), along.kernel_axes(dim, e.global_length)
                moved[a] = _insert_move(
                    node, moved[a], moves.repartition, (moved[a], want), axes, Layout(tuple(entries)), mode
                )
            elif e is not None:
                ctx.refuse(
                    node,
                    f"meets operands that mesh axis {ctx.mesh.labels()[along.group_name]} splits along different "
                    f"dims ('{a.name}': {e}; '{lead.name}': {t}), and fxhalo does not move a shard from one "
                    "dim to another on a mesh yet",
                    "split both operands along the same dims (fxhalo.from_local(..., like=x)), or shard one dim "
                    "only (a one-axis group)",
                )
    for a, m in moved.items():
        if m is not a:
            node.replace_input_with(a, m)


def _check_alike_on_shared_dims(node, inputs) -> None:
    """Operands of which one has a dim several axes split: each other one must be laid out alike (the same
    layout and global shape), or replicated without spanning a sharded dim (a broadcast scalar, a bias
    along the channels); else the walk starts again with the merge gathering first (no moves onto such a
    dim)."""
    ref = next(a for a in inputs if shared_dims(layout_of(a)))
    layout, shape = layout_of(ref), global_shape(ref)
    pos = [s.dim - len(shape) for _, s in split_axes(layout)]  # broadcasting aligns dims from the right
    for a in inputs:
        a_layout, a_shape = layout_of(a), global_shape(a)
        if a_layout == layout and a_shape == shape:
            continue
        replicated = not (isinstance(a_layout, Layout) and a_layout.is_sharded)
        if replicated and a_shape is not None and all(len(a_shape) < -p or a_shape[p] == 1 for p in pos):
            continue
        _merged_too_early([ref], f"node '{node.name}' meets '{a.name}' laid out otherwise than '{ref.name}'")


def _split_alike(e, t: Sharded, dim: int, along, lengths: bool = True) -> bool:
    """Is ``e`` split along ``dim`` as ``t`` is over the axis domain ``along``: the same rows on each rank
    (``lengths=False``: a contiguous split of the same dim, whatever the lengths)?"""
    if not (isinstance(e, Sharded) and e.dim == dim and e.contiguous):
        return False
    return not lengths or along.lengths(e.global_length) == along.lengths(t.global_length)


def _block_rows(s: Sharded, ctx) -> list[list[int]]:
    """Every rank's global rows under a contiguous layout: one block each."""
    return [list(range(a, b)) for a, b in ctx.domain.partition(s.global_length)]


def _interleaved_rows(s: Sharded, ctx) -> list[list[int]]:
    """Every rank's global rows, in local order, under a layout interleaved ``s.outer`` times: the same
    slice of each of the ``outer`` blocks (the balanced partition of a block)."""
    block = int(s.global_length) // s.outer
    return [[k * block + j for k in range(s.outer) for j in range(a, b)] for a, b in ctx.domain.partition(block)]


def _insert_move(node, a, kernel, args, axes, layout: Sharded | Layout, mode):
    """Insert ``kernel(*args, axes=axes)`` before ``node`` as the moved version of its input ``a``, laid
    out as ``layout`` (one axis's entry, or a mesh's whole layout)."""
    with node.graph.inserting_before(node):
        moved = node.graph.call_function(kernel, args, {"axes": axes})
    _copy_source(moved, node)
    moved.meta[GLOBAL_VALUE] = a.meta.get(GLOBAL_VALUE, example_value(a))
    moved.meta[LAYOUT] = layout if isinstance(layout, Layout) else Layout((layout,))
    _set_value(moved, _empty(_local_shape(global_shape(a), moved.meta[LAYOUT]), example_value(a), mode))
    return moved


def _local_shape(shape, layout: Layout) -> list[int]:
    """The global ``shape`` with each sharded dim at this rank's length (every mesh axis's)."""
    local = list(shape)
    for s in layout.axes:
        if isinstance(s, Sharded):
            local[s.dim] = s.local
    return local


def _shard_assigned_target(node, ctx, mode) -> None:
    """Before ``target[index] = value`` with a sharded value: a replicated target (a zero buffer the
    values are written into) is sharded where the value's sharded dim lands (balanced; a free slice),
    for this write and every later use; and the value's rows move when they are not split as the rows
    they are written to.  On a mesh, axis by axis (an FNO's buffer, split along both mode dims)."""
    if node.op != "call_function" or node.target is not operator.setitem:
        return
    if not ctx.on_mesh:
        _shard_assigned_target_along(node, ctx.domain, 0, 1, mode)
        return
    for axis, along in enumerate(ctx.mesh.axes):
        with axis_view(axis):
            _shard_assigned_target_along(node, along, axis, ctx.n_axes, mode)


def _with_entry(a, axis: int, entry: Sharded, n_axes: int) -> Layout:
    """``a``'s layout with mesh ``axis``'s entry replaced by ``entry``."""
    layout = layout_of(a)
    entries = list(layout.axes) if isinstance(layout, Layout) else [None] * n_axes
    entries[axis] = entry
    return Layout(tuple(entries))


def _shard_assigned_target_along(node, along, axis: int, n_axes: int, mode) -> None:
    """:func:`_shard_assigned_target` along one mesh axis (``along``: its domain), inside its axis view."""
    target, index, value = node.args
    st, sv = sharding_of(target), sharding_of(value)
    t_shape, v_shape = global_shape(target), global_shape(value)
    if not isinstance(sv, Sharded) or not sv.contiguous or t_shape is None or v_shape is None:
        return
    if st is None:
        dims = [
            d
            for d in range(len(t_shape))
            if (assigned_dim(index, len(t_shape), len(v_shape), d) or (0, -1))[1] == sv.dim
        ]
        if len(dims) != 1 or t_shape[dims[0]] < along.size:
            return  # the rule refuses
        n = t_shape[dims[0]]
        st = layout_split(dims[0], n, along)
        layout = _with_entry(target, axis, st, n_axes)
        # The buffer made at its local size (no whole buffer on any rank), else sliced to it.
        if not _make_local_factory(target, st, layout, mode, after=node):
            axes = along.kernel_axes(st.dim, n)
            moved = _insert_move(node, target, moves.own_rows, (target,), axes, layout, mode)
            later = node
            while True:  # this write and every later use read the sharded buffer
                later.replace_input_with(target, moved)
                if later.op == "output":
                    break
                later = later.next
    if not isinstance(st, Sharded):
        return
    found = assigned_dim(index, len(t_shape), len(v_shape), st.dim)
    if found is None or isinstance(found[0], int) or found[1] != sv.dim:
        return
    item, _ = found
    part = along.partition(st.global_length)
    want = (
        tuple(b - a for a, b in part)
        if item == slice(None, None, None)
        else tuple(c for c, _ in moves.rows_of_slice(item, part))
    )
    if sum(want) != int(sv.global_length) or want == along.lengths(sv.global_length):
        return
    axes = along.kernel_axes(sv.dim, sv.global_length)
    layout = _with_entry(value, axis, Sharded(sv.dim, want[along.rank], along.length_of(want)), n_axes)
    node.replace_input_with(value, _insert_move(node, value, moves.repartition, (value, want), axes, layout, mode))


_FACTORIES = (torch.zeros, torch.ones, torch.empty, torch.full)


def _make_local_factory(target, st: Sharded, layout: Layout, mode, after) -> bool:
    """A buffer made by ``torch.zeros(sizes...)`` (or ones, empty, full) and used from ``after`` on
    only: make it at this rank's size along ``st.dim`` and lay it out as ``layout``.  False when it is
    not."""
    if target.op != "call_function" or target.target not in _FACTORIES or not target.args:
        return False
    order = {n: i for i, n in enumerate(target.graph.nodes)}
    if any(order[u] < order[after] for u in target.users):
        return False
    # torch.full(size, value) and torch.zeros((B, C, H, W)) take one size argument, torch.zeros(B, C, H, W) several
    packed = target.target is torch.full or isinstance(target.args[0], (tuple, list, torch.Size))
    sizes = target.args[0] if packed else target.args
    if not all(isinstance(v, int) for v in sizes) or len(sizes) <= st.dim:
        return False
    local = list(sizes)
    local[st.dim] = st.local
    target.args = (tuple(local), *target.args[1:]) if packed else tuple(local)
    target.meta[LAYOUT] = layout
    _set_value(target, _empty(local, example_value(target), mode))
    return True


def _lengths(s: Sharded, ctx) -> tuple[int, ...]:
    return ctx.domain.lengths(s.global_length)


# -- step 5: too short to shard --------------------------------------------------------------


def _axis_domains(ctx) -> tuple:
    """The one-axis domain of each mesh axis (a 1-D domain: itself)."""
    return ctx.mesh.axes if ctx.on_mesh else (ctx.domain,)


def _gather_sharded_inputs(node, ctx, mode, only_axes=None) -> None:
    """Step 5: each sharded input of ``node`` gathered whole (one all-gather per sharded mesh axis, or per
    axis of ``only_axes``), so that ``node`` computes replicated (along those axes); the gathered value
    carries ``(axis, dim)`` pairs under ``GATHERED``."""
    domains = _axis_domains(ctx)
    for a in list(node.all_input_nodes):
        layout = layout_of(a)
        if not isinstance(layout, Layout) or not any(isinstance(s, Sharded) for s in layout.axes):
            continue
        whole, entries, gathered = a, list(layout.axes), []
        for axis, (s, domain) in enumerate(zip(layout.axes, domains)):
            if not isinstance(s, Sharded) or (only_axes is not None and axis not in only_axes):
                continue
            with node.graph.inserting_before(node):
                whole = node.graph.call_function(
                    moves.all_rows, (whole,), {"axes": domain.kernel_axes(s.dim, s.global_length)}
                )
            _copy_source(whole, node)
            entries[axis] = None
            gathered.append((axis, s.dim))
            whole.meta[GLOBAL_VALUE] = a.meta.get(GLOBAL_VALUE, example_value(a))
            whole.meta[LAYOUT] = Layout(tuple(entries))
            _set_value(whole, _localized(whole.meta[GLOBAL_VALUE], None, whole.meta[LAYOUT], mode))
        if gathered:
            whole.meta[GATHERED] = tuple(gathered)
            node.replace_input_with(a, whole)


#: node.meta key: ``((mesh axis, tensor dim), ...)`` a replicated value was gathered along (step 5), while
#: it is too short for that axis's ranks
GATHERED = "fxhalo_gathered_dim"


def _shard_again_where_it_grows(node, ctx, mode) -> int:
    """After step 5: a replicated value computed from gathered rows is sharded again (balanced, a free
    slice) along each gathered mesh axis as soon as its dim is long enough for every rank of that axis to
    hold a row; until then it carries the pair under ``GATHERED``.  Returns 1 when it inserted a slice."""
    found = {a.meta[GATHERED] for a in node.all_input_nodes if GATHERED in a.meta}
    shape = global_shape(node)
    if len(found) != 1 or shape is None:
        return 0
    domains, current, keep = _axis_domains(ctx), node, []
    entries = [None] * len(domains)
    users = list(node.users)
    for axis, dim in found.pop():
        if dim >= len(shape) or shape[dim] <= 1:
            continue  # the dim is gone (a reduction): nothing to shard again
        domain = domains[axis]
        if shape[dim] < domain.size:
            keep.append((axis, dim))
            continue
        current = _slice_after(node, current, entries, axis, domain, dim, shape[dim], mode)
    if keep:
        current.meta[GATHERED] = tuple(keep)
    if current is node:
        return 0
    for user in users:
        user.replace_input_with(node, current)
    return 1


def _slice_after(node, current, entries: list, axis: int, domain, dim: int, length: int, mode):
    """Insert, after ``current`` (``node``'s value so far, whole along mesh ``axis``), this rank's rows of
    ``dim`` along that axis (a free slice, balanced); ``entries`` (the layout's, updated in place) gets the
    axis's entry.  Returns the slice."""
    with node.graph.inserting_after(current):
        sliced = node.graph.call_function(moves.own_rows, (current,), {"axes": domain.kernel_axes(dim, length)})
    _copy_source(sliced, node)
    entries[axis] = Sharded(dim, domain.local_length(length), length)
    sliced.meta[GLOBAL_VALUE] = node.meta[GLOBAL_VALUE]
    sliced.meta[LAYOUT] = Layout(tuple(entries))
    _set_value(sliced, _localized(node.meta[GLOBAL_VALUE], None, sliced.meta[LAYOUT], mode))
    return sliced


#: node.meta key: ``((mesh axis, dim, ndim, length), ...)``: a value gathered along those axes before a
#: reshape merged its dim into another that a second axis splits (H and W into tokens), and whole along
#: them since: it is sliced again along an axis once a value of ``ndim`` dims has ``length`` rows on ``dim``
#: again (the reshape back), so the ops after it are not computed on every rank of that axis
MERGED = "fxhalo_merged_dim"


def _shard_again_after_merge(node, ctx, mode) -> None:
    """A value computed whole along the axes a merge gathered (``MERGED`` on an input) is sliced along each
    (balanced, a free slice) where its dim is back at its length and no other axis splits it; the axes
    still waiting ride on to the users.  Correct wherever it fires: a slice of a value whole along an axis
    is a layout like any other."""
    found = {a.meta[MERGED] for a in node.all_input_nodes if MERGED in a.meta}
    shape, layout = global_shape(node), layout_of(node)
    if len(found) != 1 or shape is None or not isinstance(layout, Layout):
        return
    entries, keep, current, users = list(layout.axes), [], node, list(node.users)
    for axis, dim, ndim, length in found.pop():
        if entries[axis] is not None:
            continue  # sharded along that axis again already (an operand aligned to a sharded one)
        taken = {s.dim for s in entries if isinstance(s, Sharded)}
        if len(shape) != ndim or shape[dim] != length or dim in taken:
            keep.append((axis, dim, ndim, length))
            continue
        current = _slice_after(node, current, entries, axis, ctx.mesh.axes[axis], dim, length, mode)
    if keep:
        current.meta[MERGED] = tuple(keep)
    for user in users:
        user.replace_input_with(node, current)


# -- example values ---------------------------------------------------------------------------


def _fake_mode(gm):
    for node in gm.graph.nodes:
        val = example_value(node)
        inner = getattr(val, "_local", val)
        if isinstance(inner, FakeTensor):
            return inner.fake_mode
    return None


def _plain(val):
    """A global example value without the DomainTensor wrapper (its inner fake has the global shape)."""
    from ..tensor import DomainTensor

    if isinstance(val, DomainTensor):
        return val._local
    if isinstance(val, (tuple, list)):
        return type(val)(_plain(v) for v in val)
    return val


def _set_value(node, val) -> None:
    node.meta["example_value"] = val
    if "val" in node.meta:
        node.meta["val"] = val


def _empty(shape, like, mode):
    with mode:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, requires_grad=like.requires_grad)


def _run_fake(node, mode, fallback):
    """The node's value on its inputs' local example values, or ``fallback`` when the op does not run."""
    if mode is None or node.op not in ("call_function", "call_method"):
        return fallback
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), example_value)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a probe that fails is expected here, not an error to log
    try:
        with mode:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
    except Exception:
        return fallback
    finally:
        quiet.setLevel(level)


def _local_value(node, out, mode):
    """The node's example value at local shapes, from its global value and its layout ``out``."""
    current = example_value(node)
    glob = node.meta[GLOBAL_VALUE]  # the DomainTensor itself: its requires_grad and device are the true ones
    layout = as_layout(out)
    if isinstance(layout, Items) and isinstance(glob, (tuple, list)):
        got = current if isinstance(current, (tuple, list)) and len(current) == len(glob) else glob
        return type(glob)(_localized(g, c, item, mode) for g, c, item in zip(glob, got, layout))
    return _localized(glob, current, layout, mode)


def _localized(glob, current, layout, mode):
    """``current`` if it is the local value of the global ``glob`` under ``layout``, else a new fake one.

    The metadata come from ``glob``, the traced (outer) value: a DomainTensor's slab never
    requires grad, and for a meta slab (fxhalo.explain) not even its device is the tensor's.
    The boundary pass reads ``requires_grad`` to decide which replicated values get gradient syncs.
    """
    if not isinstance(glob, torch.Tensor):
        return current
    shape = _local_shape(glob.shape, layout) if isinstance(layout, Layout) else list(glob.shape)
    if isinstance(current, torch.Tensor) and (
        list(current.shape),
        current.dtype,
        current.device,
        current.requires_grad,
    ) == (shape, glob.dtype, glob.device, glob.requires_grad):
        return current
    return _empty(shape, glob, mode) if mode is not None else current


def _copy_source(new, node) -> None:
    """The user's source line of the node an inserted move serves (reports name the move itself)."""
    if "stack_trace" in node.meta:
        new.meta["stack_trace"] = node.meta["stack_trace"]
