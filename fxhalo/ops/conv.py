"""Convolution over a sharded spatial dim: one halo exchange, then the local conv."""

from __future__ import annotations

import torch.nn.functional as F

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..geometry import Window, WindowPlan, plan_window
from ..halo import Edge, takes_received_rows
from .rows import ints
from .shift import pad_entries

__all__ = ["conv", "conv_plan", "conv_window", "explicit_padding", "padding_edge"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def explicit_padding(padding, kernel, dilation) -> tuple[tuple[int, int], ...]:
    """``(lo, hi)`` per spatial dim for an int, a tuple, ``'valid'`` or ``'same'``.

    ``'same'`` follows torch: total ``d(k-1)``, the smaller half before.
    """
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in ints(padding, n))


def padding_edge(mode: str, pad, dim: int, ndim: int, value: float = 0.0) -> tuple[Edge, list[int]]:
    """Fold a pad in front of a conv into the conv's halo along the sharded ``dim``: ``(edge, rest)``.

    The one padding fold of the eager layers and the compiled rules.  ``pad`` is an
    ``F.pad`` spec (last dim first) of the conv's ``ndim``-D input: the
    ``F.pad(x, pad, mode, value)`` node before a conv, or a conv module's
    ``_reversed_padding_repeated_twice`` with its ``padding_mode`` (``'zeros'`` is
    ``constant`` 0).  ``edge`` covers the pad's rows along ``dim`` with ``mode`` at the
    *global* edges only: pass ``edge_mode=edge.mode, edge_value=edge.value,
    edge_extent=edge.extent`` to :func:`conv`, whose own padding lies beyond it.
    ``rest`` is ``pad`` with ``dim``'s entries zeroed: pad the other dims locally with
    it (``F.pad(x, rest, mode, value)``) before the exchange, so halo rows arrive padded.
    """
    (lo, hi), rest = pad_entries(pad, ndim, dim)
    if mode == "zeros":
        mode, value = "constant", 0.0
    return Edge(mode, float(value or 0.0), (int(lo), int(hi))), rest


def conv_window(x_shape, weight_shape, stride, padding, dilation, domain: Domain, edge: Edge) -> tuple[int, Window]:
    """``(sharded spatial dim, window)`` of a conv of a local slab of shape ``x_shape``."""
    nd = len(weight_shape) - 2
    sdim = domain.dim_of(len(x_shape)) - (len(x_shape) - nd)
    kernel = tuple(weight_shape[2:])
    stride, dilation = ints(stride, nd), ints(dilation, nd)
    pads = explicit_padding(padding, kernel, dilation)
    extent = edge.extent or (0, 0)
    return sdim, Window(
        kernel[sdim], stride[sdim], dilation[sdim], pads[sdim][0] + extent[0], pads[sdim][1] + extent[1]
    )


def conv_plan(
    x_shape, weight_shape, stride, padding, dilation, domain: Domain, edge: Edge, length: int | None = None
) -> tuple[int, WindowPlan]:
    """``(sharded spatial dim, plan)`` of a conv of a local slab of shape ``x_shape``.

    ``length``: the global length of the sharded dim (see :meth:`Domain.global_length`).
    """
    sdim, window = conv_window(x_shape, weight_shape, stride, padding, dilation, domain, edge)
    nd = len(weight_shape) - 2
    n = domain.global_length(x_shape[domain.dim_of(len(x_shape))], length)
    what = f"conv{nd}d (kernel {tuple(weight_shape[2:])}, stride {ints(stride, nd)})"
    return sdim, plan_window(window, domain, n, edge, what)


def _local_conv(x, weight, bias, stride, padding, dilation, groups, sdims):
    """The conv of an extended slab: its sharded dims (spatial indices ``sdims``) are already padded (the
    halo), the others are not."""
    nd = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    dilation_t = ints(dilation, nd)
    pads = list(explicit_padding(padding, kernel, dilation_t))
    for sdim in sdims:
        pads[sdim] = (0, 0)
    symmetric = [min(lo, hi) for lo, hi in pads]
    extra = [(lo - s, hi - s) for (lo, hi), s in zip(pads, symmetric)]
    if any(lo or hi for lo, hi in extra):
        # torch's conv takes only symmetric padding; the asymmetric rest is zeros.
        x = F.pad(x, [p for lo_hi in reversed(extra) for p in lo_hi])
    return _CONV[nd](x, weight, bias, ints(stride, nd), tuple(symmetric), dilation_t, groups)


@takes_received_rows
@several_axes
def conv(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    axes: tuple[ShardAxis, ...],
    edge_mode: str = "zeros",
    edge_value: float = 0.0,
    edge_extent: tuple[int, int] = (0, 0),
):
    """``F.conv{1,2,3}d`` of a slab sharded along each of ``axes`` (a dim and its group's ranks).

    Each axis's ``length`` is the input's global length along its dim (compiled graphs
    pass it; eager callers may leave it to :meth:`Domain.global_length`).
    The conv's own ``padding`` is zeros past the global edges.  A pad folded in
    from an ``F.pad`` just before the conv covers ``edge_extent`` rows on each side
    with ``edge_mode`` (``constant`` with ``edge_value``, ``reflect``,
    ``replicate`` or ``circular``); the conv's padding lies beyond it.

    On several mesh axes the block's halo, corners included, arrives in one collective
    over the whole domain (:mod:`fxhalo.block_halo`): every rank receives exactly the
    values of its extended block that it lacks, and the padding past the global edges is
    never sent.

    ``halo_rows=`` (:func:`fxhalo.halo.takes_received_rows`): the halo rows along one axis, already
    fetched by the producer of ``input`` (:func:`fxhalo.ops.norm.group_norm_exchange`); then the conv
    communicates nothing.
    """
    edge = Edge(edge_mode, float(edge_value), tuple(edge_extent))
    exchanges, sdims = {}, []
    for a, (shard_dim, group_name, length) in enumerate(each_axis(axes)):
        domain = Domain.from_group(group_name, shard_dim=shard_dim)
        sdim, plan = conv_plan(tuple(input.shape), tuple(weight.shape), stride, padding, dilation, domain, edge, length)
        exchanges[a] = (domain.dim_of(input.ndim), plan.halo, edge)
        sdims.append(sdim)
    x = exchange_on_axes(input, axes, exchanges)
    return _local_conv(x, weight, bias, stride, padding, dilation, groups, sdims)
