"""Normalisation whose statistics span the sharded dim: one all_reduce per op.

Each kernel has the signature of its ``torch.nn.functional`` namesake plus
``shard_dim``, ``group_name`` and ``length``, the input's global length along
``shard_dim`` (it gives the global element count; without it, each rank's count
travels with its statistics), and is called only when the op's statistics
include the sharded dim (the rule leaves the other cases, such as eval-mode batch
norm, as the local torch op).  The statistics of one op (every group, instance
or channel) travel in one float64 tensor through one ``all_reduce``: see
:func:`fxhalo.ops.moments.global_moments` for the scheme and its measured accuracy.
The backward comes from autograd through that all_reduce, whose backward
all-reduces the statistics' gradients: the cross-rank terms of the norm's
gradient (one more all_reduce in the backward).

Running statistics (batch norm in training, instance norm with
``use_input_stats``) are updated in place exactly as one device updates them, with
the unbiased variance from the *global* count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..block_halo import block_parts, own_rows
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..halo import Edge, exchange_parts, plan_halo
from ..mesh import whole_coords, whole_group
from .collectives import all_reduce_sum
from .moments import (
    apply_norm,
    global_count,
    global_moments,
    global_moments_with_rows,
    norm_coefficients,
    normalize,
    over_axes,
)

__all__ = [
    "group_norm",
    "group_norm_exchange",
    "batch_norm_exchange",
    "instance_norm",
    "batch_norm",
    "layer_norm",
    "layer_norm_exchange",
    "rms_norm",
]


def _per_channel(t, ndim: int):
    """A ``[C]`` parameter shaped to broadcast against an ``ndim``-D ``[N, C, ...]`` tensor."""
    return None if t is None else t.reshape(1, -1, *([1] * (ndim - 2)))


def _per_group(t, num_groups: int, ndim: int):
    """A ``[C]`` parameter shaped to broadcast against an ``[N, G, C // G, ...]`` grouped tensor."""
    return None if t is None else t.reshape(1, num_groups, -1, *([1] * (ndim - 2)))


def _update_running(running, value, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * value``, in place, outside autograd."""
    if running is None:
        return
    with torch.no_grad():
        running.mul_(1 - momentum).add_(value.detach().reshape(running.shape).to(running.dtype), alpha=momentum)


@several_axes
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, axes: tuple[ShardAxis, ...]):
    """``F.group_norm`` whose per-sample statistics span the sharded (spatial) dim."""
    lengths, group_name = over_axes(axes, input.ndim, shift=1)  # grouping adds a dim before them
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, c // num_groups, *input.shape[2:])
    dims = tuple(range(2, grouped.ndim))
    count = global_count(grouped, dims, lengths)
    mean, m2, count = global_moments(grouped, dims, group_name, count)
    w, b = _per_group(weight, num_groups, input.ndim), _per_group(bias, num_groups, input.ndim)
    per = _per_channel_of_group(grouped)
    return normalize(grouped, mean, m2 / count, eps, w, b, per).reshape(input.shape)


@several_axes
def group_norm_exchange(
    input,
    num_groups,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
    halo: tuple,
):
    """:func:`group_norm`, and the halo values of its output that the next halo op needs, in **one**
    ``all_to_all_single`` (:func:`fxhalo.ops.moments.global_moments_with_rows`).

    ``halo`` is the consumer's exchange, one entry per mesh axis: ``(needs, edge mode, edge value,
    edge extent)`` (its :class:`~fxhalo.halo.HaloPlan`'s ``needs``, every rank's needed global rows,
    and its :class:`~fxhalo.halo.Edge`), or ``None`` for an axis whose rows its block takes as they
    are.  The values fetched are the ones the consumer's own exchange would fetch
    (:func:`fxhalo.halo.exchange_parts` along one axis, :func:`fxhalo.block_halo.block_parts` for a
    block on several), so it takes them as its own (``halo_rows=``,
    :func:`fxhalo.halo.takes_received_rows`).  The exchange carries the *input's* values and each
    rank normalises what it receives with the global statistics, so no second exchange is needed.
    Returns ``(output, received)``: ``received`` is normalised like ``output``.  Every axis's
    ``length`` (the global length) is required: it gives every rank's element count.
    """
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, c // num_groups, *input.shape[2:])
    dims = tuple(range(2, grouped.ndim))
    # grouping adds a dim before the sharded one
    mean, m2, count, received = _moments_with_halo(grouped, dims, 1, input, axes, halo)
    w, b = _per_group(weight, num_groups, input.ndim), _per_group(bias, num_groups, input.ndim)
    coefficients = norm_coefficients(
        input.dtype, mean, m2 / count, eps, w, b, _per_channel_of_group(grouped), grouped.numel()
    )

    def norm(t):
        return apply_norm(t.reshape(n, num_groups, c // num_groups, *t.shape[2:]), coefficients).reshape(t.shape)

    return norm(input), norm(received)


def _per_channel_of_group(grouped):
    """The shape of a group norm's coefficients per channel, ``(N, G, C / G, 1, ...)``, for a grouped input."""
    return (*grouped.shape[:3], *([1] * (grouped.ndim - 3)))


def _moments_with_halo(x, dims, shift: int, rows, axes, halo):
    """``(mean, m2, count, received)``: the global moments of ``x`` over ``dims`` and the halo values of
    ``rows`` that the consumer's exchange ``halo`` needs, in one collective (``x`` is ``rows`` or a view
    of it whose sharded dims sit ``shift`` dims later).

    ``halo`` has one entry per mesh axis of ``axes``: ``(needs, edge mode, edge value, edge extent)``
    of the consumer's exchange along that axis (:class:`~fxhalo.halo.HaloPlan`'s ``needs`` and
    :class:`~fxhalo.halo.Edge`), or ``None`` for an axis whose rows the consumer's block takes as they
    are.  One axis: the rows of a 1-D exchange over its group; several: a block's values over the whole
    domain (:mod:`fxhalo.block_halo`), where the statistics are summed too."""
    axes = each_axis(axes)
    domains = [Domain.from_group(a.group_name, shard_dim=a.dim) for a in axes]
    sharded = [d.dim_of(rows.ndim) for d in domains]
    plans = []
    for axis, domain, dim, entry in zip(axes, domains, sharded, halo):
        if entry is None:  # the block takes this axis's rows as they are, as block_halo.exchange_on_axes does
            plans.append(own_rows(rows, domain))
            continue
        needs, mode, value, extent = entry
        edge = Edge(mode, float(value), None if extent is None else tuple(extent))
        needs = tuple(tuple(r) for r in needs)
        plans.append((dim, plan_halo(domain.partition(axis.global_length), needs, domain.rank, edge), edge))
    per_row = math.prod(x.shape[d] for d in dims if d - shift not in sharded)
    if len(axes) == 1:
        (dim, plan, edge), (domain,), (axis,) = plans[0], domains, axes
        sends, recv, received = exchange_parts(rows, dim, plan, edge)
        counts = tuple(per_row * domain.local_length(axis.global_length, q) for q in range(domain.size))
    else:
        coords = whole_coords(axes)
        sends, recv, received, _ = block_parts(rows, plans, coords)
        counts = tuple(
            per_row * math.prod(d.local_length(a.global_length, c) for d, a, c in zip(domains, axes, where))
            for where in coords
        )
    mean, m2, count, chunks = global_moments_with_rows(x, dims, sends, recv, counts, whole_group(axes))
    return mean, m2, count, received(chunks)


@several_axes
def batch_norm_exchange(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
    halo: tuple,
):
    """:func:`batch_norm` in training, and the halo rows of its output that a windowed op needs, in one
    ``all_to_all_single``: :func:`group_norm_exchange` with per-channel statistics over the batch and
    every spatial dim (the running statistics updated as :func:`batch_norm` updates them)."""
    dims = (0,) + tuple(range(2, input.ndim))
    mean, m2, count, received = _moments_with_halo(input, dims, 0, input, axes, halo)
    norm = _trained_batch_norm(mean, m2, count, running_mean, running_var, weight, bias, momentum, eps)
    return norm(input), norm(received)


@several_axes
def instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.instance_norm`` with statistics per (sample, channel) over the global spatial extent.

    Without ``use_input_stats`` the running statistics normalise and nothing is
    communicated.  With it, running statistics (if given) move towards the batch
    mean of the per-instance means and unbiased variances, as torch does.
    """
    lengths, group_name = over_axes(axes, input.ndim)
    if not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = tuple(range(2, input.ndim))
    count = global_count(input, dims, lengths)
    mean, m2, count = global_moments(input, dims, group_name, count)
    _update_running(running_mean, mean.mean(0), momentum)
    _update_running(running_var, (m2 / (count - 1)).mean(0), momentum)
    return normalize(input, mean, m2 / count, eps, _per_channel(weight, input.ndim), _per_channel(bias, input.ndim))


@several_axes
def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.batch_norm``: in training, per-channel statistics over the batch and every spatial dim.

    In eval mode (``training=False``) the running statistics normalise and the op
    is local.
    """
    lengths, group_name = over_axes(axes, input.ndim)
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = (0,) + tuple(range(2, input.ndim))
    count = global_count(input, dims, lengths)
    mean, m2, count = global_moments(input, dims, group_name, count)
    return _trained_batch_norm(mean, m2, count, running_mean, running_var, weight, bias, momentum, eps)(input)


def _trained_batch_norm(mean, m2, count, running_mean, running_var, weight, bias, momentum, eps):
    """A batch norm in training from its global moments: the running statistics updated (in place, the
    unbiased variance from the global count), and the function that normalises a tensor with them."""
    _update_running(running_mean, mean, momentum)
    _update_running(running_var, m2 / (count - 1), momentum)

    def norm(t):
        return normalize(t, mean, m2 / count, eps, _per_channel(weight, t.ndim), _per_channel(bias, t.ndim))

    return norm


@several_axes
def layer_norm(
    input,
    normalized_shape,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.layer_norm`` whose ``normalized_shape`` covers the sharded dim.

    ``weight`` and ``bias`` (shape ``normalized_shape``) must then be sharded like the
    input, so that each rank applies its own rows of them; the rule refuses
    replicated ones.
    """
    lengths, group_name = over_axes(axes, input.ndim)
    dims = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    count = global_count(input, dims, lengths)
    mean, m2, count = global_moments(input, dims, group_name, count)
    return normalize(input, mean, m2 / count, eps, weight, bias)


@several_axes
def layer_norm_exchange(
    input,
    normalized_shape,
    eps=1e-5,
    *,
    axes: tuple[ShardAxis, ...],
    halo: tuple,
):
    """:func:`layer_norm` without affine terms, and the halo rows of its output that the next halo op
    needs, in one ``all_to_all_single``, as :func:`group_norm_exchange`.  (With ``weight`` or ``bias``
    each received row would need its owner's rows of them too: the pass leaves such a norm alone.)"""
    dims = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    mean, m2, count, received = _moments_with_halo(input, dims, 0, input, axes, halo)
    return normalize(input, mean, m2 / count, eps), normalize(received, mean, m2 / count, eps)


@several_axes
def rms_norm(input, normalized_shape, weight=None, eps=None, *, axes: tuple[ShardAxis, ...]):
    """``F.rms_norm`` whose ``normalized_shape`` covers the sharded dim: one all_reduce.

    The mean square over the normalised dims is each rank's sum of squares, summed
    over the ranks in float64 (with the element count in the same tensor when
    ``length`` is not given), over the global count.  ``weight`` (shape
    ``normalized_shape``) must be sharded like the input, as for :func:`layer_norm`.
    """
    lengths, group_name = over_axes(axes, input.ndim)
    dims = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    squares = input.double().square().sum(dims, keepdim=True)
    count = global_count(input, dims, lengths)
    if count is None:  # the count travels with the sums: shards may differ in length
        local = math.prod(input.shape[d] for d in dims)
        packed = torch.cat([squares.reshape(-1), squares.new_full((1,), local)])
        total = all_reduce_sum(packed, group_name)
        squares, count = total[:-1].reshape(squares.shape), total[-1]
    else:
        squares = all_reduce_sum(squares, group_name)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    out = input * torch.rsqrt(squares / count + eps).to(input.dtype)
    return out if weight is None else out * weight
