"""Reductions over the sharded dim, adaptive pooling to one row along it, and softmax along it.

Every kernel here issues **one** functional collective (:mod:`fxhalo.ops.collectives`)
in the forward and returns a value that is replicated on every rank (softmax: sharded
like its input).  The backward is whatever autograd derives from the collective:

==========================  =====================  ======================  ===================
kernel                      forward collective     backward collective     message per rank
==========================  =====================  ======================  ===================
sum_, mean, avg pool        ``all_reduce``         ``all_reduce``          the result
var, std, norms             ``all_reduce``         ``all_reduce``          2 float64 per output
amax, amin, max/min, pool   ``all_gather``         ``reduce_scatter``      2 float64 per output
softmax, log_softmax        ``all_gather``         ``reduce_scatter``      2 per output row
==========================  =====================  ======================  ===================

The statistics behind ``var`` and ``std`` are in :mod:`fxhalo.ops.moments`, the
losses over pixels in :mod:`fxhalo.ops.loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..domain import Domain, ShardAxis, each_axis, one_axis, several_axes
from ..mesh import whole_group
from .collectives import all_gather_stacked, all_reduce_sum
from .moments import _acc_dtype, _count, global_count, global_moments, over_axes

__all__ = [
    "reduced_dims",
    "sum_",
    "mean",
    "var",
    "std",
    "amax",
    "amin",
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "softmax",
    "log_softmax",
]


# -- small helpers -------------------------------------------------------------


def reduced_dims(dim, ndim: int) -> tuple[int, ...]:
    """The dims a reduction's ``dim`` argument names, non-negative and sorted.

    ``None`` and an empty list both mean every dim, as for ``torch.sum``/``amax``/``var``.
    """
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(sorted({int(d) + ndim if int(d) < 0 else int(d) for d in dims}))


def _squeeze(t: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return t if keepdim else t.squeeze(dims) if dims else t


# -- sum, mean, var, std -------------------------------------------------------


def _sum_dtype(x: torch.Tensor, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if x.dtype.is_floating_point or x.dtype.is_complex else torch.int64


@several_axes
def sum_(input, dim=None, keepdim=False, *, dtype=None, axes: tuple[ShardAxis, ...]):
    """``torch.sum`` over ``dim`` (which includes the sharded dims): local sum, one all_reduce."""
    _, group_name = over_axes(axes, input.ndim)
    dims = reduced_dims(dim, input.ndim)
    out_dtype = _sum_dtype(input, dtype)
    local = input.sum(dims, keepdim=keepdim, dtype=_acc_dtype(out_dtype))
    return all_reduce_sum(local, group_name).to(out_dtype)


@several_axes
def mean(input, dim=None, keepdim=False, *, dtype=None, axes: tuple[ShardAxis, ...]):
    """``torch.mean``: the global sum over the global count (one all_reduce; it carries the count too
    when ``length`` is not given)."""
    lengths, group_name = over_axes(axes, input.ndim)
    dims = reduced_dims(dim, input.ndim)
    out_dtype = dtype or input.dtype
    local = input.sum(dims, keepdim=keepdim, dtype=_acc_dtype(out_dtype))
    count = global_count(input, dims, lengths)
    if count is None:
        total, count = _sum_with_count(local, _count(input, dims), group_name)
    else:
        total = all_reduce_sum(local, group_name)
    return (total / count).to(out_dtype)


def _sum_with_count(local: torch.Tensor, count: int, group_name: str):
    """``(sum over ranks of local, sum over ranks of count)`` in one float64 all_reduce.

    Shards may differ in length, so the count is summed rather than assumed;
    float64 holds counts exactly up to 2**53.
    """
    packed = torch.cat([local.double().reshape(-1), local.new_full((1,), count, dtype=torch.float64)])
    total = all_reduce_sum(packed, group_name)
    return total[:-1].reshape(local.shape), total[-1]


@several_axes
def var(input, dim=None, correction=1, keepdim=False, *, axes: tuple[ShardAxis, ...]):
    """``torch.var`` with ``correction`` (1 = unbiased), from :func:`global_moments`."""
    lengths, group_name = over_axes(axes, input.ndim)
    dims = reduced_dims(dim, input.ndim)
    _, m2, count = global_moments(input, dims, group_name, global_count(input, dims, lengths))
    return _squeeze(m2 / _degrees_of_freedom(count, correction), dims, keepdim).to(input.dtype)


@several_axes
def std(input, dim=None, correction=1, keepdim=False, *, axes: tuple[ShardAxis, ...]):
    """``torch.std``: the square root of :func:`var`, taken in float64."""
    lengths, group_name = over_axes(axes, input.ndim)
    dims = reduced_dims(dim, input.ndim)
    _, m2, count = global_moments(input, dims, group_name, global_count(input, dims, lengths))
    return _squeeze((m2 / _degrees_of_freedom(count, correction)).sqrt(), dims, keepdim).to(input.dtype)


def _degrees_of_freedom(count, correction):
    """``max(count - correction, 0)`` for a count that is an int or a (float64) tensor."""
    return (count - correction).clamp_min(0) if isinstance(count, torch.Tensor) else max(count - correction, 0)


# -- amax, amin and max pooling ------------------------------------------------


class _Pick(torch.autograd.Function):
    """The extreme of per-rank candidates, with the gradient routed by ``weights``.

    ``values`` is ``[P, ...]``: every rank's local extreme (from an all_gather).  The
    forward returns their extreme exactly; the backward gives rank ``r``'s candidate
    ``weights[r]`` of the gradient.  The weights say how the single-device op splits
    the gradient between tied elements that live on different ranks; they sum to 1.
    This is a local op: the all_gather before it carries the gradient between ranks.
    """

    @staticmethod
    def forward(ctx, values, weights, largest):
        ctx.save_for_backward(weights)
        return values.amax(0) if largest else values.amin(0)

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        return grad.unsqueeze(0) * weights.to(grad.dtype), None, None


def _pick_across_ranks(local, tiebreak, largest: bool, share: bool, group_name: str):
    """Combine every rank's local extreme ``local`` into the global one (one all_gather).

    ``tiebreak`` (same shape, no gradient) travels with each candidate.  With
    ``share``, it is the number of tied elements on that rank and the gradient is
    split evenly over all tied elements, as ``torch.amax`` does.  Otherwise it is
    the candidate's global position and the first one gets all of it, as max
    pooling does.
    """
    if not local.dtype.is_floating_point:  # no gradient to route: gather the values alone
        gathered = all_gather_stacked(local, group_name)
        return gathered.amax(0) if largest else gathered.amin(0)
    # float64 holds any float value exactly, and positions up to 2**53.
    packed = torch.stack([local.double(), tiebreak.detach().double()])
    gathered = all_gather_stacked(packed, group_name)
    values, tags = gathered[:, 0], gathered[:, 1]
    best = values.detach().amax(0) if largest else values.detach().amin(0)
    hit = values.detach() == best
    if share:
        counts = torch.where(hit, tags, 0)
        weights = counts / counts.sum(0).clamp_min(1)
    else:
        first = torch.where(hit, tags, math.inf).amin(0)
        weights = (hit & (tags == first)).double()
    return _Pick.apply(values, weights, largest).to(local.dtype)


def _extreme(input, dim, keepdim, largest, group_name):
    dims = reduced_dims(dim, input.ndim)
    local = input.amax(dims, keepdim=True) if largest else input.amin(dims, keepdim=True)
    ties = (input.detach() == local.detach()).sum(dims, keepdim=True)
    out = _pick_across_ranks(local, ties, largest, True, group_name)
    return _squeeze(out, dims, keepdim)


@several_axes
def amax(input, dim=(), keepdim=False, *, axes: tuple[ShardAxis, ...]):
    """``torch.amax`` over ``dim`` (which includes the sharded dim, or on a mesh every axis's).

    The gradient is split evenly over every element equal to the maximum, on every
    rank, as on one device: each rank sends its local maximum and how many
    elements reach it (one all_gather, over the whole domain on several axes).
    """
    return _extreme(input, dim, keepdim, True, whole_group(axes))


@several_axes
def amin(input, dim=(), keepdim=False, *, axes: tuple[ShardAxis, ...]):
    """``torch.amin``; see :func:`amax`."""
    return _extreme(input, dim, keepdim, False, whole_group(axes))


def _pool_sizes(input, output_size, nd: int) -> tuple:
    """The output size per spatial dim of an adaptive pool (``None``: the input's)."""
    sizes = output_size if isinstance(output_size, (list, tuple)) else (output_size,) * nd
    spatial = input.shape[input.ndim - nd :]
    return tuple(spatial[i] if s is None else int(s) for i, s in enumerate(sizes))


@several_axes
def adaptive_avg_pool(input, output_size, *, nd: int, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_avg_pool{nd}d`` whose output has size 1 along each sharded dim.

    The global window mean is the mean of the ranks' local window means, weighted
    by their elements (rows, or rows times columns on a mesh): one all_reduce, over
    the whole domain on several axes.
    """
    sizes = _pool_sizes(input, output_size, nd)
    block = math.prod(input.shape[a.dim] for a in each_axis(axes))
    # The window along each sharded dim is every rank's whole block: weight each local mean by its size.
    local = _AVG_POOL[nd](input.to(_acc_dtype(input.dtype)), sizes) * block
    total, count = _sum_with_count(local, block, whole_group(axes))
    return (total / count).to(input.dtype)


@several_axes
def adaptive_max_pool(input, output_size, *, nd: int, axes: tuple[ShardAxis, ...]):
    """``F.adaptive_max_pool{nd}d`` (no indices) whose output has size 1 along each sharded dim.

    Max pooling sends the whole gradient to the *first* maximum of its window in
    scan order, so each rank's candidate travels with its global flat position
    within the window's plane, and the smallest position among tied ranks wins.
    """
    local, index = _MAX_POOL[nd](input, _pool_sizes(input, output_size, nd), return_indices=True)
    position = _global_position(index, input.shape[input.ndim - nd :], input.ndim - nd, axes)
    return _pick_across_ranks(local, position, True, False, whole_group(axes))


def _global_position(index, local_spatial, first_spatial: int, axes):
    """Local flat spatial indices -> flat indices in the global spatial plane (every sharded dim of
    ``axes`` offset by this rank's start along it)."""
    global_spatial, starts = list(local_spatial), {}
    for a in each_axis(axes):
        domain = Domain.from_group(a.group_name)
        sdim = a.dim % (first_spatial + len(local_spatial)) - first_spatial
        n = domain.global_length(local_spatial[sdim], a.global_length)
        global_spatial[sdim], starts[sdim] = n, domain.bounds(n)[0]
    coords, rest = [], index
    for size in reversed(local_spatial):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    flat = torch.zeros_like(index)
    for sdim, (c, size) in enumerate(zip(coords, global_spatial)):
        flat = flat * size + c + starts.get(sdim, 0)
    return flat


_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


# -- softmax along the sharded dim --------------------------------------------


def _softmax_parts(input, dim, dtype, group_name):
    """``(x, global max, global sum of exp(x - max))``; one all_gather of (local max, local sum)."""
    x = input if dtype is None else input.to(dtype)
    xs = x.to(_acc_dtype(x.dtype))
    # The shift only keeps exp() in range; softmax does not depend on it, so it needs no gradient.
    local_max = xs.detach().amax(dim, keepdim=True)
    local_max = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
    local_sum = torch.exp(xs - local_max).sum(dim, keepdim=True)
    gathered = all_gather_stacked(torch.stack([local_max, local_sum]), group_name)
    maxes, sums = gathered[:, 0], gathered[:, 1]
    top = maxes.amax(0)
    return x, xs, top, (sums * torch.exp(maxes - top)).sum(0)


def softmax(input, dim, dtype=None, *, axes: tuple[ShardAxis, ...]):
    """``F.softmax`` along ``dim == shard_dim``: exp(x - max) / sum, with a global max and sum."""
    shard_dim, group_name, length = one_axis(axes)
    x, xs, top, total = _softmax_parts(input, dim, dtype, group_name)
    return (torch.exp(xs - top) / total).to(x.dtype)


def log_softmax(input, dim, dtype=None, *, axes: tuple[ShardAxis, ...]):
    """``F.log_softmax`` along ``dim == shard_dim``."""
    shard_dim, group_name, length = one_axis(axes)
    x, xs, top, total = _softmax_parts(input, dim, dtype, group_name)
    return (xs - top - torch.log(total)).to(x.dtype)
