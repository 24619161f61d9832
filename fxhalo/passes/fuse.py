"""Fusions: patterns of rewritten nodes that can share one exchange.

Two patterns, both applied after the rewrite, when every kernel call is in place:

* :func:`fold_pads`: ``F.pad`` along the sharded dim feeding exactly one conv
  (how ``nn.Conv*d(padding_mode=...)`` reaches the graph).  The pad's rows become
  the conv's halo edge, so one exchange fetches both.  Always on.
* :func:`fuse_norm_exchanges`: a norm's statistics travel with the next conv's halo
  rows.  On with ``fuse_exchanges`` (the default).  The norm is a GroupNorm, an
  InstanceNorm on its input's statistics with no running statistics to update (the
  same statistics and affine terms as a GroupNorm of one channel per group, so it
  becomes that kernel), or a BatchNorm in training (``batch_norm_exchange``).

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

Merging a norm's statistics with the next conv's halo exchange
--------------------------------------------------------------

A UNet block is ``conv -> GroupNorm -> activation -> conv``.  After the rewrite the
GroupNorm sums its statistics over the ranks (one collective) and the second conv
fetches its halo rows (another), forward and backward alike.  Both can travel
together: the norm is elementwise once its statistics are known, and so is the
activation, so the neighbour may send the norm's *input* rows along with its
statistics and each rank normalises and activates the rows it receives itself.

The pass looks for::

    y = fxhalo.ops.norm.group_norm(x, ...)       # one collective
    a = f_k(... f_1(y) ...)                      # elementwise, deterministic, y's only sharded operand
    z = fxhalo.ops.conv.conv(a, w, ...)          # one collective

and writes::

    y, r = fxhalo.ops.norm.group_norm_exchange(x, ..., window=<the conv's window>)   # one collective
    a = f_k(... f_1(y) ...)
    h = f_k(... f_1(r) ...)                      # the same ops, on the received rows only
    z = fxhalo.ops.conv.conv_with_halo(a, h, w, ...)

The rows exchanged, the windows and the edges are the conv's own (its
:class:`~fxhalo.geometry.Window` goes to the norm kernel), so the conv reads exactly
the rows it would have fetched; the backward comes from autograd through the one
exchange, which returns each received row's and statistic's gradient to its owner.
Random ops (dropout) stop the search: the received rows would draw other numbers
than their owner did.  Half-precision activations are left alone: the statistics
travel in the rows' buffer, and they need float32.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import torch

from ..domain import Domain, one_axis
from ..halo import Edge
from ..layout import LAYOUT, example_value, sharding_of
from ..ops import conv as conv_ops
from ..ops import norm as norm_ops
from ..ops import shift as shift_ops
from ..rules import decision_of
from ..rules.local import Elementwise
from .context import PassContext

__all__ = ["HALO_ROWS", "fold_pads", "fuse_norm_exchanges"]

#: node.meta key on the received-rows nodes the pass adds: the dim along which they are rows
#: (their length differs between ranks; the agreement check writes that dim as "halo")
HALO_ROWS = "fxhalo_halo_rows"

_RANDOM = ("dropout", "rand", "rrelu", "bernoulli")


def _source_of(node) -> dict:
    """The meta that names the user's source line, for a node the pass adds in ``node``'s place."""
    return {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}


def _is_random(node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(word in name for word in _RANDOM)


_GROUP_NORM = inspect.signature(norm_ops.group_norm)
_INSTANCE_NORM = inspect.signature(norm_ops.instance_norm)
_BATCH_NORM = inspect.signature(norm_ops.batch_norm)


def _bound(signature, node) -> dict:
    """``node``'s arguments by name (defaults filled in), ``axes`` aside."""
    a = signature.bind(*node.args, **{k: v for k, v in node.kwargs.items() if k != "axes"}, axes=None)
    a.apply_defaults()
    return a.arguments


def _exchange_call(node):
    """``(fused kernel, its arguments)`` for a norm kernel call whose statistics can travel with a conv's
    halo rows, else ``None``: ``group_norm``; ``instance_norm`` on its input's statistics with no running
    statistics to update (a group norm of one channel per group: the same statistics, the same per-channel
    affine terms); ``batch_norm`` in training (its running statistics updated by the fused kernel)."""
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
    return None


def _norm_source(conv):
    """``(norm kernel call, elementwise chain, its fused call)`` that feed ``conv``'s input, or ``None``: a
    norm that :func:`_exchange_call` can fuse.

    The chain lists the nodes between the two in graph order; each must be
    elementwise, deterministic, and read exactly one sharded node, the one before it.
    """
    chain, node = [], conv.args[0]
    while hasattr(node, "meta"):
        fused = _exchange_call(node)
        if fused is not None:
            return node, chain[::-1], fused
        if not isinstance(getattr(decision_of(node), "rule", None), Elementwise) or _is_random(node):
            return None
        sharded = [a for a in node.all_input_nodes if sharding_of(a) is not None]
        if len(sharded) != 1:
            return None
        chain.append(node)
        node = sharded[0]
    return None


def _fusible(conv, norm) -> bool:
    decision = decision_of(conv)
    if decision is None or decision.plan is None or _folded(conv):
        return False
    if not decision.plan.halo.collective or one_axis(norm.kwargs["axes"]).global_length is None:
        return False
    val = example_value(norm)
    return isinstance(val, torch.Tensor) and val.dtype in (torch.float32, torch.float64)


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


def fuse_norm_exchanges(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Fuse every ``group_norm`` (or ``instance_norm``, ``batch_norm``) ``-> elementwise ops -> conv`` of
    ``gm``; returns how many."""
    graph = gm.graph
    fused = 0
    for conv in list(graph.nodes):
        if conv.op != "call_function" or conv.target is not conv_ops.conv:
            continue
        source = _norm_source(conv)
        if source is None or not _fusible(conv, source[0]):
            continue
        norm, chain, (kernel, args) = source
        x, weight, bias, stride, padding, dilation, groups = (list(conv.args) + [None, 1, 0, 1, 1])[:7]
        s = sharding_of(norm)
        kw = conv.kwargs
        edge = Edge(kw["edge_mode"], kw["edge_value"], tuple(kw["edge_extent"]))
        local_shape = tuple(example_value(x).shape)
        domain = Domain(ctx.domain.group_name, ctx.domain.rank, ctx.domain.size, s.dim)
        _, window = conv_ops.conv_window(
            local_shape, tuple(example_value(weight).shape), stride, padding, dilation, domain, edge
        )
        with graph.inserting_before(norm):
            both = graph.call_function(
                kernel,
                args,
                dict(
                    axes=norm.kwargs["axes"],
                    window=dataclasses.astuple(window),
                    edge_mode=edge.mode,
                    edge_value=edge.value,
                    edge_extent=tuple(edge.extent),
                ),
            )
            y = graph.call_function(operator.getitem, (both, 0))
            rows = graph.call_function(operator.getitem, (both, 1))
        both.meta.update(_source_of(norm))
        y.meta.update(norm.meta)
        rows.meta[HALO_ROWS] = s.dim
        norm.replace_all_uses_with(y)
        graph.erase_node(norm)
        copies = {y: rows}
        last = rows
        for node in chain:
            with graph.inserting_before(conv):
                last = graph.node_copy(node, lambda a, copies=copies: copies.get(a, a))
            last.meta = {HALO_ROWS: s.dim}
            copies[node] = last
        x = conv.args[0]  # the norm's replacement, when the conv read the norm directly
        with graph.inserting_before(conv):
            new = graph.call_function(
                conv_ops.conv_with_halo, (x, last, weight, bias, stride, padding, dilation, groups), dict(kw)
            )
        new.meta.update(conv.meta)
        conv.replace_all_uses_with(new)
        graph.erase_node(conv)
        fused += 1
    if fused:
        graph.lint()
        gm.recompile()
    return fused
