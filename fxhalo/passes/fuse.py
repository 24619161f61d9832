"""Fusions: patterns of rewritten nodes that can share one exchange.

Two patterns, both applied after the rewrite, when every kernel call is in place:

* :func:`fold_pads`: ``F.pad`` along the sharded dim feeding exactly one conv
  (how ``nn.Conv*d(padding_mode=...)`` reaches the graph).  The pad's rows become
  the conv's halo edge, so one exchange fetches both.  Always on.
* :func:`fuse_norm_exchanges`: a norm's statistics travel with the next halo op's
  rows.  On with ``fuse_exchanges`` (the default).  The norm is a GroupNorm, an
  InstanceNorm on its input's statistics with no running statistics to update (the
  same statistics and affine terms as a GroupNorm of one channel per group, so it
  becomes that kernel), a BatchNorm in training (``batch_norm_exchange``), or a
  layer_norm without affine terms (``layer_norm_exchange``).  The halo op is any
  kernel that takes received rows (:func:`fxhalo.halo.takes_received_rows`): a conv,
  a transposed conv, a max, average or adaptive pool, an interpolation.

Folding a pad
-------------
The pass looks for::

    p = fxhalo.ops.shift.pad(x, spec, mode, value, length=N)        # one exchange
    z = fxhalo.ops.conv.conv(p, w, ..., edge_mode='zeros', length=N + lo + hi)   # another

and writes::

    q = F.pad(x, spec without the sharded dim, mode, value)          # local, only if it pads other dims
    z = fxhalo.ops.conv.conv(q, w, ..., edge_mode=mode, edge_extent=(lo, hi), length=N)

The conv's output rows are the same either way (it owns its output rows by the
partition rule); the pad's rows at the global edges come from the edge mode.

Merging a norm's statistics with the next halo op's exchange
-------------------------------------------------------------

A UNet block is ``conv -> GroupNorm -> activation -> conv``.  After the rewrite the
GroupNorm sums its statistics over the ranks (one collective) and the second conv
fetches its halo rows (another), forward and backward alike.  Both can travel
together: the norm is elementwise once its statistics are known, and so is the
activation, so the neighbour may send the norm's *input* rows along with its
statistics and each rank normalises and activates the rows it receives itself.  The
same holds for any op that fetches halo rows of its input: a pool, an upsample, a
transposed conv.

The pass looks for::

    y = fxhalo.ops.norm.group_norm(x, ...)       # one collective
    a = f_k(... f_1(y) ...)                      # row-wise, deterministic, y's only sharded operand
    z = fxhalo.ops.<halo op>(a, ...)             # one collective

and writes::

    y, r = fxhalo.ops.norm.group_norm_exchange(x, ..., halo=<per axis: the halo op's needs and edge>)
    a = f_k(... f_1(y) ...)
    h = f_k(... f_1(r) ...)                      # the same ops, on the received rows only
    z = fxhalo.ops.<halo op>(a, ..., halo_rows=h, halo_needs=<per axis: the same needs>)

Which rows the halo op fetches is asked of its kernel, not worked out here:
:func:`fxhalo.halo.planned_exchange` runs the kernel on the graph's example values up
to its exchange, which reports its :class:`~fxhalo.halo.HaloPlan` (one per mesh axis)
instead of communicating.  The norm kernel plans the same exchange from the plans'
``needs`` and edges, so the halo op reads exactly the rows it would have fetched (its
kernel checks ``halo_needs`` against its own plans when it is traced).  The fill past the global
edges (zeros, ``-inf`` for a max pool, a folded pad's mode) stays the halo op's: it is
added after the copied row-wise ops, as it was.  The backward comes from autograd
through the one exchange, which returns each received row's and statistic's gradient
to its owner.  Random ops (dropout) stop the search: the received rows would draw other
numbers than their owner did.  Half-precision activations are left alone: the
statistics travel in the rows' buffer, and they need float32.

On a mesh the halo op's exchange is a block's, over the whole domain, the group the norm
sums its statistics over too, so both go in one collective; the received cells travel
packed (:func:`fxhalo.block_halo.block_parts`), so the copied ops run on one tensor.  An
op that exchanges along one axis only is left alone: its collective runs over that
axis's group, not the whole domain.
"""

from __future__ import annotations

import contextlib
import inspect
import operator

import torch
import torch.nn.functional as F

from ..block_halo import packable
from ..domain import Domain, each_axis
from ..halo import HaloPlan, planned_exchange, takes_received
from ..layout import LAYOUT, example_value, layout_of, sharding_of, split_axes
from ..ops import adaptive_pool as adaptive_ops
from ..ops import conv as conv_ops
from ..ops import norm as norm_ops
from ..ops import pool as pool_ops
from ..ops import shift as shift_ops
from ..rules import decision_of
from ..rules.local import Elementwise
from .context import PassContext

__all__ = ["HALO_ROWS", "fold_pads", "fuse_norm_exchanges"]

#: node.meta key on the received-rows nodes the pass adds: the dim along which they are rows
#: (their length differs between ranks; the agreement check writes that dim as "halo")
HALO_ROWS = "fxhalo_halo_rows"

_RANDOM = ("dropout", "rand", "rrelu", "bernoulli")


def _fake_mode_of(val):
    """The fake mode ``val`` belongs to (Dynamo's, not the backend's fresh one), to run kernels on the
    graph's example values; a no-op context for a real tensor."""
    return getattr(val, "fake_mode", None) or contextlib.nullcontext()


def _source_of(node) -> dict:
    """The meta that names the user's source line, for a node the pass adds in ``node``'s place."""
    return {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}


def _is_random(node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(word in name for word in _RANDOM)


_GROUP_NORM = inspect.signature(norm_ops.group_norm)
_INSTANCE_NORM = inspect.signature(norm_ops.instance_norm)
_BATCH_NORM = inspect.signature(norm_ops.batch_norm)
_LAYER_NORM = inspect.signature(norm_ops.layer_norm)


def _bound(signature, node) -> dict:
    """``node``'s arguments by name (defaults filled in), ``axes`` aside."""
    a = signature.bind(*node.args, **{k: v for k, v in node.kwargs.items() if k != "axes"}, axes=None)
    a.apply_defaults()
    return a.arguments


def _exchange_call(node):
    """``(fused kernel, its arguments)`` for a norm kernel call whose statistics can travel with the next
    halo op's rows, else ``None``: ``group_norm``; ``instance_norm`` on its input's statistics with no
    running statistics to update (a group norm of one channel per group: the same statistics, the same
    per-channel affine terms); ``batch_norm`` in training (its running statistics updated by the fused
    kernel); ``layer_norm`` without affine terms (with them, each received row would need its owner's
    rows of the weight too)."""
    if node.op != "call_function":
        return None
    if node.target is norm_ops.group_norm:
        a = _bound(_GROUP_NORM, node)
        return norm_ops.group_norm_exchange, (a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"])
    if node.target is norm_ops.instance_norm:
        a = _bound(_INSTANCE_NORM, node)
        val = example_value(a["input"])
        if a["use_input_stats"] and a["running_mean"] is None and a["running_var"] is None and val is not None:
            return norm_ops.group_norm_exchange, (a["input"], val.shape[1], a["weight"], a["bias"], a["eps"])
    if node.target is norm_ops.batch_norm:
        a = _bound(_BATCH_NORM, node)
        if a["training"] is True:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            return norm_ops.batch_norm_exchange, tuple(a[k] for k in names)
    if node.target is norm_ops.layer_norm:
        a = _bound(_LAYER_NORM, node)
        if a["weight"] is None and a["bias"] is None:
            return norm_ops.layer_norm_exchange, (a["input"], a["normalized_shape"], a["eps"])
    return None


def _norm_source(consumer):
    """``(norm kernel call, elementwise chain, its fused call)`` that feed ``consumer``'s input, or
    ``None``: a norm that :func:`_exchange_call` can fuse.

    The chain lists the nodes between the two in graph order; each must be row-wise
    (:func:`_rowwise`) and read exactly one sharded node, the one before it.
    """
    chain, node = [], consumer.args[0] if consumer.args else None
    while hasattr(node, "meta"):
        fused = _exchange_call(node)
        if fused is not None:
            return node, chain[::-1], fused
        if not _rowwise(node):
            return None
        sharded = [a for a in node.all_input_nodes if _sharded_dims(a)]
        if len(sharded) != 1:
            return None
        chain.append(node)
        node = sharded[0]
    return None


def _rowwise(node) -> bool:
    """Does ``node`` map each row along the sharded dim on its own, deterministically, so that it may run
    again on the received rows?  Elementwise ops do, and so does a pad of the other dims (the one
    :func:`fold_pads` puts before a conv whose pad it folded, so that halo rows arrive padded)."""
    if _is_random(node):
        return False
    if isinstance(getattr(decision_of(node), "rule", None), Elementwise):
        return True
    if node.op == "call_function" and node.target in (torch._C._nn.pad, F.pad) and node.args:
        dims, val = _sharded_dims(node.args[0]), example_value(node.args[0])
        return (
            bool(dims)
            and val is not None
            and all(shift_ops.pad_entries(node.args[1], val.ndim, d)[0] == (0, 0) for d in dims)
        )
    return False


def _sharded_dims(node) -> tuple[int, ...]:
    """The dims of ``node``'s value that mesh axes split, in mesh-axis order (none: replicated)."""
    return tuple(s.dim for _, s in split_axes(layout_of(node))) if hasattr(node, "meta") else ()


def _consumer_plans(consumer, norm) -> tuple[HaloPlan | None, ...] | None:
    """The plans of ``consumer``'s exchange, one per mesh axis (``None``: an axis whose rows its block takes
    as they are), if ``norm``'s fused kernel can fetch its rows: the consumer's kernel takes received rows,
    exchanges over the norm's axes and partitions, with something to send, in a collective over the group
    the norm sums its statistics over (one axis's, or the whole domain's for a block on several axes), and
    the norm's output is float32 or float64 (the statistics travel in the rows' buffer).

    The plans come from the kernel itself (:func:`fxhalo.halo.planned_exchange`, on the graph's example
    values), so the rows fetched are the ones the kernel would fetch, whatever its geometry."""
    if consumer.op != "call_function" or not takes_received(consumer.target) or "halo_rows" in consumer.kwargs:
        return None
    axes = norm.kwargs["axes"]
    if consumer.kwargs.get("axes") != axes:
        return None
    val = example_value(norm)
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float32, torch.float64):
        return None
    if any(axis.global_length is None for axis in each_axis(axes)):
        return None
    args, kwargs = torch.fx.node.map_arg((consumer.args, consumer.kwargs), example_value)
    with _fake_mode_of(val):
        plans = planned_exchange(consumer.target, args, kwargs)
    if plans is None or len(plans) != len(axes) or not any(p is not None and p.collective for p in plans):
        return None
    if len(axes) > 1 and (sum(p is not None for p in plans) < 2 or not packable(_sharded_dims(norm))):
        # One axis's exchange runs over that axis's group, while the statistics sum over the whole domain;
        # and a block's received values travel packed along its sharded dims, which must be adjacent.
        return None
    for axis, plan in zip(each_axis(axes), plans):
        domain = Domain.from_group(axis.group_name, shard_dim=axis.dim)
        if plan is not None and plan.partition != domain.partition(axis.global_length):
            return None
    return plans


def _folded(conv) -> bool:
    """Whether a pad was folded into ``conv``'s edge (such convs keep their own exchange)."""
    return conv.kwargs.get("edge_mode", "zeros") != "zeros" or tuple(conv.kwargs.get("edge_extent", (0, 0))) != (0, 0)


def fold_pads(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Fold every sharded ``pad -> conv`` of ``gm`` into the conv's halo; returns how many."""
    graph = gm.graph
    folded = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target is not conv_ops.conv or _folded(conv):
            continue
        pad = conv.args[0]
        if getattr(pad, "target", None) is not shift_ops.pad or len(pad.users) != 1:
            continue
        x, spec, mode, value = (list(pad.args) + ["constant", None])[:4]
        s = sharding_of(x)
        edge, rest = conv_ops.padding_edge(mode, spec, s.dim, example_value(x).ndim, value)
        if min(edge.extent) < 0:
            continue  # a crop: the pad kernel's own business
        if any(rest):
            # Pad the other dims first, locally, so that halo rows arrive already padded.
            with graph.inserting_before(conv):
                fill = edge.value if mode == "constant" else None
                x_padded = graph.call_function(torch._C._nn.pad, (x, tuple(rest), mode, fill))
            x_padded.meta.update(_source_of(pad))
            x_padded.meta[LAYOUT] = x.meta[LAYOUT]
            val = example_value(x)
            if isinstance(val, torch.Tensor):  # the norm fusion plans the conv on example values
                with _fake_mode_of(val):
                    x_padded.meta["val"] = torch._C._nn.pad(val, tuple(rest), mode, fill)
            x = x_padded
        edge = dict(edge_mode=edge.mode, edge_value=edge.value, edge_extent=edge.extent, axes=pad.kwargs["axes"])
        conv.args = (x, *conv.args[1:])
        conv.kwargs = dict(conv.kwargs, **edge)
        graph.erase_node(pad)
        folded += 1
    if folded:
        graph.lint()
        gm.recompile()
    return folded


def _fusible_consumer(node, ctx: PassContext) -> bool:
    """Can ``node``, a halo op, take its rows from a norm before it?  Every halo kernel can
    (:func:`~fxhalo.halo.takes_received`); a max pool only with ``ctx.fuse_max_pools``.  With a max pool's
    rows fused, and the normalised rows read by another halo op too (SkipUNet's pattern on 45 rows), GCC's
    loop splitting miscompiled one tiled kernel of Inductor's C++ backward: wrong gradients on the halo's
    rows.  The backend compiles with ``-fno-split-loops`` where it can (:mod:`fxhalo.passes.cpp_flags`), and
    fuses max pools only then, or under a compiler with no C++ (``aot_eager``; see
    :func:`fxhalo.backend.fuses_max_pools`).  The adaptive max pools alike, whose backward also scatters by
    the argmax.  Unfused, such a norm keeps its own all_reduce (``tests/distributed/test_inductor.py`` runs
    the fused pattern through Inductor with the flag)."""
    if node.op != "call_function" or not takes_received(node.target):
        return False
    return ctx.fuse_max_pools or node.target not in _UNFUSED_MAX_POOLS


_UNFUSED_MAX_POOLS = (
    pool_ops.max_pool1d,
    pool_ops.max_pool2d,
    pool_ops.max_pool3d,
    adaptive_ops.adaptive_max_pool1d,
    adaptive_ops.adaptive_max_pool2d,
    adaptive_ops.adaptive_max_pool3d,
)


def fuse_norm_exchanges(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Fuse every ``group_norm`` (or ``instance_norm``, ``batch_norm``, ``layer_norm``) ``-> elementwise ops
    -> halo op`` of ``gm``; returns how many."""
    graph = gm.graph
    fused = 0
    for consumer in list(graph.nodes):
        source = _norm_source(consumer) if _fusible_consumer(consumer, ctx) else None
        if source is None:
            continue
        norm, chain, (kernel, args) = source
        plans = _consumer_plans(consumer, norm)
        if plans is None:
            continue
        rows_dim = _sharded_dims(norm)[0]  # the dim along which ranks receive different numbers of rows
        halo = tuple(None if p is None else (p.needs, p.edge.mode, p.edge.value, p.edge.extent) for p in plans)
        with graph.inserting_before(norm):
            both = graph.call_function(kernel, args, dict(axes=norm.kwargs["axes"], halo=halo))
            y = graph.call_function(operator.getitem, (both, 0))
            rows = graph.call_function(operator.getitem, (both, 1))
        both.meta.update(_source_of(norm))
        y.meta.update(norm.meta)
        rows.meta[HALO_ROWS] = rows_dim
        norm.replace_all_uses_with(y)
        graph.erase_node(norm)
        copies = {y: rows}
        last = rows
        for node in chain:
            with graph.inserting_before(consumer):
                last = graph.node_copy(node, lambda a, copies=copies: copies.get(a, a))
            last.meta = {HALO_ROWS: rows_dim}
            copies[node] = last
        consumer.kwargs = dict(
            consumer.kwargs, halo_rows=last, halo_needs=tuple(None if p is None else p.needs for p in plans)
        )
        fused += 1
    if fused:
        graph.lint()
        gm.recompile()
    return fused
