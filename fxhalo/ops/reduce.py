"""Reductions over the sharded dim, softmax along it, and losses over pixels.

Every kernel here issues **one** functional collective in the forward and returns a
value that is replicated on every rank (softmax: sharded like its input).  The
backward is whatever autograd derives from the collective:

==========================  =====================  ======================  ===================
kernel                      forward collective     backward collective     message per rank
==========================  =====================  ======================  ===================
sum, mean, losses           ``all_reduce``         ``all_reduce``          the result (losses:
                                                                           result + denominator)
var, std, norms             ``all_reduce``         ``all_reduce``          2 float64 per output
amax, amin, max/min, pool   ``all_gather``         ``reduce_scatter``      2 float64 per output
softmax, log_softmax        ``all_gather``         ``reduce_scatter``      2 per output row
==========================  =====================  ======================  ===================

On gloo, a sum of up to :data:`EXCHANGE_SUM_MAX_BYTES` travels by one
``all_to_all_single`` instead of an ``all_reduce`` (forward and backward alike): it is
several times faster there.  See :func:`all_reduce_sum`.

**Gradient convention.**  Inside a compiled graph the gradient that a rank holds for
a *replicated* value is a partial one: the true gradient is the sum over the domain
group.  That is what the functional ``all_reduce``'s autograd formula (backward = an
``all_reduce`` of the gradients) assumes, and it is how parameter gradients already
work (each rank holds a partial one).  A replicated statistic consumed by sharded
rows (a norm's mean) therefore gets the cross-rank terms of its gradient summed in
the backward, which is what makes the backward exact.  At the graph's boundary,
replicated tensors carry their *full* gradient on every rank, as for
:func:`fxhalo.gather`: ``loss.backward()`` on every rank is right.
:mod:`fxhalo.ops.grad` converts between the two, and :mod:`fxhalo.passes.boundary`
inserts the conversions at the graph's inputs and outputs.

**Statistics.**  Mean and variance are merged from *shifted* local sums in float64;
see :func:`global_moments` for the scheme and the measurements that chose it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)
import torch.nn.functional as F

from ..domain import Domain, resolve_group

__all__ = [
    "group_size",
    "EXCHANGE_SUM_MAX_BYTES",
    "sums_by_exchange",
    "all_reduce_sum",
    "all_gather_stacked",
    "reduced_dims",
    "global_moments",
    "global_moments_with_rows",
    "local_sums",
    "shifted_sums",
    "sums_from_shifted",
    "moments_from_sums",
    "normalize",
    "global_count",
    "sum",
    "mean",
    "var",
    "std",
    "amax",
    "amin",
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "softmax",
    "log_softmax",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "cross_entropy",
    "nll_loss",
]


# -- collectives ---------------------------------------------------------------


def group_size(group_name: str) -> int:
    return dist.get_world_size(resolve_group(group_name))


#: Sums of at most this many bytes travel by exchange on gloo (see :func:`all_reduce_sum`).
EXCHANGE_SUM_MAX_BYTES = 64 * 1024


def sums_by_exchange(t: torch.Tensor, group_name: str) -> bool:
    """True when :func:`all_reduce_sum` adds ``t`` up with an ``all_to_all_single`` instead of an ``all_reduce``.

    Only CPU tensors on gloo, up to :data:`EXCHANGE_SUM_MAX_BYTES`.  The backend is the
    same on every rank, so every rank decides the same.
    """
    if t.device.type != "cpu" or t.numel() * t.element_size() > EXCHANGE_SUM_MAX_BYTES:
        return False
    return "gloo" in str(dist.get_backend(resolve_group(group_name)))


def all_reduce_sum(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``t`` over the group, on every rank; its backward sums the gradients (partial -> full).

    One collective.  On NCCL (and on gloo for large tensors) an ``all_reduce``.  On
    gloo, a small tensor goes to every rank with one ``all_to_all_single`` and each
    rank adds the copies up itself: gloo's all_reduce of a few KiB takes several
    round trips, about 0.4-3.6 ms on 2 ranks with compute between the calls, against
    0.16-0.46 ms for the exchange (docs/performance.md).  Every rank adds the same
    copies in rank order, its own included, so the sums are bit-identical across
    ranks, as an all_reduce's are.  The exchange's backward is an exchange that
    returns each copy's gradient to its sender, where the copies' gradients add up:
    the same partial -> full sum as the all_reduce's backward.
    """
    t = t.contiguous()
    if sums_by_exchange(t, group_name):
        size = group_size(group_name)
        n = t.numel()
        copies = t.reshape(1, n).expand(size, n).reshape(size * n)
        got = torch.ops._c10d_functional.all_to_all_single(copies, [n] * size, [n] * size, group_name)
        return torch.ops._c10d_functional.wait_tensor(got).view(size, *t.shape).sum(0)
    out = torch.ops._c10d_functional.all_reduce(t, "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def all_gather_stacked(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Every rank's ``t``, stacked along a new dim 0 (rank order); backward is a reduce-scatter."""
    size = group_size(group_name)
    out = torch.ops._c10d_functional.all_gather_into_tensor(t.unsqueeze(0).contiguous(), size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


# -- small helpers -------------------------------------------------------------


def reduced_dims(dim, ndim: int) -> tuple[int, ...]:
    """The dims a reduction's ``dim`` argument names, non-negative and sorted.

    ``None`` and an empty list both mean every dim, as for ``torch.sum``/``amax``/``var``.
    """
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return tuple(sorted({int(d) + ndim if int(d) < 0 else int(d) for d in dims}))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half precision in float32, as torch's own reductions do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _squeeze(t: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return t if keepdim else t.squeeze(dims) if dims else t


def _count(x: torch.Tensor, dims: tuple[int, ...]) -> int:
    return math.prod(x.shape[d] for d in dims)


# -- mean and variance ---------------------------------------------------------


def global_moments(x: torch.Tensor, dims: tuple[int, ...], group_name: str, count: int | None = None):
    """``(mean, m2, count)`` over ``dims`` of the global tensor (``keepdim``; float64).

    ``count``, the global number of elements per statistic, when the caller knows it
    (:func:`global_count`); otherwise each rank's count travels with its sums.

    ``m2`` is the sum of squared deviations from the mean; ``count`` the global
    number of elements per statistic.  One ``all_reduce`` of a float64 tensor that
    holds, for each statistic, this rank's ``sum x`` and ``sum x^2``.  Those two sums
    are formed from *shifted* local sums: with ``c`` this rank's own mean (a
    constant for autograd), ``s1 = sum(x - c)`` and ``s2 = sum((x - c)^2)`` are
    accurate in the working dtype, and ``sum x = n c + s1``, ``sum x^2 = s2 + c (2 s1
    + n c)`` are exact enough in float64 for the global ``m2 = sum x^2 - (sum x)^2 / N``.

    Why this scheme (measured by simulating 4 ranks on one process, GroupNorm of a
    (2, 8, 64, 64) fp32 tensor with 2 groups, max abs error of the output against
    the float64 one-device result; the fp32 one-device ``F.group_norm`` itself is
    off by 5.3e-07 / 4.1e-05 / 9.8e-04 at mean 0 / 1e3 / 1e4, std 1):

    ============================================  =======  =======  =======
    scheme                                        mean 0   mean 1e3 mean 1e4
    ============================================  =======  =======  =======
    fp32 ``[sum x, sum x^2]``, one all_reduce     5.5e-07  1.4e-01  1.3e+03
    Chan merge of per-rank (mean, M2), all_gather 5.3e-07  2.1e-05  5.5e-04
    shifted sums, float64 merge, one all_reduce   5.3e-07  2.0e-05  4.2e-04
    the same, mean kept as fp32 hi + lo pair      5.3e-07  5.0e-07  4.7e-07
    ============================================  =======  =======  =======

    Plain fp32 sums cancel catastrophically.  The two stable merges are limited by
    the mean rounded to fp32 (half an ulp of 1e3 is 3e-05); keeping the float64 mean
    as a hi + lo pair (:func:`normalize`) removes that and is as accurate as float64
    throughout.  We chose the all_reduce: its message (2 float64 per statistic) does
    not grow with the rank count, unlike an all_gather's, and it is one collective.
    The float64 merge itself loses about ``2e-16 (mean/std)^2`` of the variance:
    below fp32 rounding up to a mean/std ratio of about 1e4.
    ``tests/unit/test_moments.py`` repeats the mean-1e3 measurement.
    """
    if count is not None:  # known from the global length: only the two sums travel
        total = all_reduce_sum(local_sums(x, dims, with_count=False), group_name)
    else:
        total = all_reduce_sum(local_sums(x, dims), group_name)
        count = total[2]  # exact: float64 counts up to 2**53
    mean, m2 = moments_from_sums(total[:2], count)
    return mean, m2, count


def global_moments_with_rows(
    x: torch.Tensor,
    dims: tuple[int, ...],
    rows: torch.Tensor,
    dim: int,
    plan,
    counts: tuple[int, ...],
    group_name: str,
    *,
    edge=None,
):
    """:func:`global_moments` of ``x`` and the halo rows of ``rows`` that ``plan`` asks for, in **one**
    ``all_to_all_single``.

    ``rows`` is the tensor whose rows along ``dim`` the plan exchanges (``x`` may be a
    view of it, e.g. grouped); ``counts[q]`` is the number of elements per statistic
    on rank ``q``.  Every rank sends to every rank (itself included) its
    :func:`shifted_sums` ``(c, s1, s2)`` in the working dtype, followed by the rows
    that rank needs; each rank then merges the statistics in float64, in rank order
    (so every rank gets the same bits, and the same accuracy as :func:`global_moments`),
    and gets the received rows in source-rank order, ready for
    :func:`fxhalo.halo.assemble`.  The backward is the exchange's own: each copy's
    gradient goes back to its sender.  Returns ``(mean, m2, count, received)``.

    The statistics and the rows share one buffer, so ``x`` must be float32 or
    float64 (its own accumulation dtype).  ``edge`` describes the rows' fill past the
    global edges to the halo observers (:func:`fxhalo.halo.observe_halos`).
    """
    from ..halo import send_buffer

    if _acc_dtype(x.dtype) != x.dtype or rows.dtype != x.dtype:
        raise AssertionError(f"statistics and rows share one buffer: {x.dtype} and {rows.dtype}")
    size = group_size(group_name)
    stats = torch.cat([t.reshape(-1) for t in shifted_sums(x, dims)])
    k = stats.numel()
    row_numel = math.prod(d for i, d in enumerate(rows.shape) if i != dim)
    sends = [
        torch.cat([stats, r.reshape(-1)]) for r in send_buffer(rows, dim, plan, edge).split(list(plan.send_splits))
    ]
    send_sizes = [k + n * row_numel for n in plan.send_splits]
    recv_sizes = [k + n * row_numel for n in plan.recv_splits]
    got = torch.ops._c10d_functional.all_to_all_single(torch.cat(sends), recv_sizes, send_sizes, group_name)
    got = torch.ops._c10d_functional.wait_tensor(got)
    keep = list(x.shape)
    for d in dims:
        keep[d] = 1
    total, received, at = None, [], 0
    for q in range(size):
        c, s1, s2 = got.narrow(0, at, k).view(3, *keep).unbind(0)
        sums = torch.stack(sums_from_shifted(c, s1, s2, counts[q]))
        total = sums if total is None else total + sums
        shape = [plan.recv_splits[q]] + [d for i, d in enumerate(rows.shape) if i != dim]
        received.append(got.narrow(0, at + k, recv_sizes[q] - k).view(shape))
        at += recv_sizes[q]
    count = math.fsum(counts)  # (this module's own ``sum`` is the kernel)
    mean, m2 = moments_from_sums(total, count)
    return mean, m2, count, torch.cat(received, 0).movedim(0, dim)


def global_count(x: torch.Tensor, dims: tuple[int, ...], dim: int, length: int | None) -> int | None:
    """Elements per statistic of a reduction over ``dims`` of the global tensor, whose dim ``dim``
    has ``length`` rows (``None`` when the length is not known)."""
    if length is None:
        return None
    return math.prod(length if d == dim else x.shape[d] for d in dims)


def shifted_sums(x: torch.Tensor, dims: tuple[int, ...]):
    """``(c, s1, s2)`` over ``dims`` (``keepdim``), in the accumulation dtype: ``c`` this rank's
    own mean (a constant for autograd), ``s1 = sum(x - c)``, ``s2 = sum((x - c)^2)``.

    Any shift gives the same sums; this one keeps ``x - c`` small, so that ``s1`` and
    ``s2`` are accurate in the working dtype.  :func:`sums_from_shifted` turns them
    into ``sum x`` and ``sum x^2`` in float64.
    """
    xs = x.to(_acc_dtype(x.dtype))
    c = xs.detach().mean(dims, keepdim=True)
    r = xs - c
    return c, r.sum(dims, keepdim=True), (r * r).sum(dims, keepdim=True)


def sums_from_shifted(c, s1, s2, n) -> list[torch.Tensor]:
    """``[sum x, sum x^2]`` in float64 from :func:`shifted_sums` of ``n`` elements."""
    c, s1, s2 = c.double(), s1.double(), s2.double()
    return [n * c + s1, s2 + c * (2 * s1 + n * c)]


def local_sums(x: torch.Tensor, dims: tuple[int, ...], with_count: bool = True) -> torch.Tensor:
    """``stack([sum x, sum x^2, count])`` over ``dims`` (``keepdim``), in float64, from
    :func:`shifted_sums`.

    The count travels with the sums (unless ``with_count`` is False), so shards of
    different lengths give the true global count without knowing the lengths.
    """
    n = _count(x, dims)
    sums = sums_from_shifted(*shifted_sums(x, dims), n)
    return torch.stack(sums + [torch.full_like(sums[0], n)] if with_count else sums)


def moments_from_sums(total: torch.Tensor, count):
    """``(mean, m2)`` from the summed ``[sum x, sum x^2]`` of ``count`` elements (float64)."""
    mean = total[0] / count
    return mean, (total[1] - total[0] * mean).clamp_min(0)


def normalize(x, mean, var, eps, weight=None, bias=None):
    """``(x - mean) / sqrt(var + eps) * weight + bias``, computed so that a large mean loses nothing.

    ``mean`` and ``var`` are float64 and broadcast against ``x``; ``weight`` and
    ``bias`` are already shaped to broadcast too.  The float64 mean is split into
    ``hi + lo`` in the working dtype: ``x - hi`` is exact for data near the mean,
    and ``lo`` carries the rest.
    """
    acc = _acc_dtype(x.dtype)
    hi = mean.to(acc)
    lo = (mean - hi.double()).to(acc)
    scale = torch.rsqrt(var + eps).to(acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    offset = -lo * scale
    if bias is not None:
        offset = offset + bias.to(acc)
    return torch.addcmul(offset, x.to(acc) - hi, scale).to(x.dtype)


# -- sum, mean, var, std -------------------------------------------------------


def _sum_dtype(x: torch.Tensor, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if x.dtype.is_floating_point or x.dtype.is_complex else torch.int64


def sum(input, dim=None, keepdim=False, *, dtype=None, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.sum`` over ``dim`` (which includes ``shard_dim``): local sum, one all_reduce."""
    dims = reduced_dims(dim, input.ndim)
    out_dtype = _sum_dtype(input, dtype)
    local = input.sum(dims, keepdim=keepdim, dtype=_acc_dtype(out_dtype))
    return all_reduce_sum(local, group_name).to(out_dtype)


def mean(input, dim=None, keepdim=False, *, dtype=None, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.mean``: the global sum over the global count (one all_reduce; it carries the count too
    when ``length`` is not given)."""
    dims = reduced_dims(dim, input.ndim)
    out_dtype = dtype or input.dtype
    local = input.sum(dims, keepdim=keepdim, dtype=_acc_dtype(out_dtype))
    count = global_count(input, dims, shard_dim % input.ndim, length)
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


def var(input, dim=None, correction=1, keepdim=False, *, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.var`` with ``correction`` (1 = unbiased), from :func:`global_moments`."""
    dims = reduced_dims(dim, input.ndim)
    _, m2, count = global_moments(input, dims, group_name, global_count(input, dims, shard_dim % input.ndim, length))
    return _squeeze(m2 / _degrees_of_freedom(count, correction), dims, keepdim).to(input.dtype)


def std(input, dim=None, correction=1, keepdim=False, *, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.std``: the square root of :func:`var`, taken in float64."""
    dims = reduced_dims(dim, input.ndim)
    _, m2, count = global_moments(input, dims, group_name, global_count(input, dims, shard_dim % input.ndim, length))
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


def amax(input, dim=(), keepdim=False, *, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.amax`` over ``dim`` (which includes ``shard_dim``).

    The gradient is split evenly over every element equal to the maximum, on every
    rank, as on one device: each rank sends its local maximum and how many
    elements reach it (one all_gather).
    """
    return _extreme(input, dim, keepdim, True, group_name)


def amin(input, dim=(), keepdim=False, *, shard_dim: int, group_name: str, length: int | None = None):
    """``torch.amin``; see :func:`amax`."""
    return _extreme(input, dim, keepdim, False, group_name)


def _pool_axes(input, output_size, nd: int, shard_dim: int) -> tuple[int, tuple]:
    """``(sharded spatial axis, output size per axis)`` of an adaptive pool."""
    sizes = output_size if isinstance(output_size, (list, tuple)) else (output_size,) * nd
    spatial = input.shape[input.ndim - nd :]
    sizes = tuple(spatial[i] if s is None else int(s) for i, s in enumerate(sizes))
    return shard_dim - (input.ndim - nd), sizes


def adaptive_avg_pool(input, output_size, *, nd: int, shard_dim: int, group_name: str, length: int | None = None):
    """``F.adaptive_avg_pool{nd}d`` whose output has size 1 along ``shard_dim``.

    The global window mean is the mean of the ranks' local window means, weighted
    by their rows: one all_reduce.
    """
    axis, sizes = _pool_axes(input, output_size, nd, shard_dim)
    rows = input.shape[shard_dim]
    # The window along the sharded axis is every rank's whole shard: weight each local mean by its rows.
    local = _AVG_POOL[nd](input.to(_acc_dtype(input.dtype)), sizes) * rows
    total, count = _sum_with_count(local, rows, group_name)
    return (total / count).to(input.dtype)


def adaptive_max_pool(input, output_size, *, nd: int, shard_dim: int, group_name: str, length: int | None = None):
    """``F.adaptive_max_pool{nd}d`` (no indices) whose output has size 1 along ``shard_dim``.

    Max pooling sends the whole gradient to the *first* maximum of its window in
    scan order, so each rank's candidate travels with its global flat position
    within the window's plane, and the smallest position among tied ranks wins.
    """
    axis, sizes = _pool_axes(input, output_size, nd, shard_dim)
    local, index = _MAX_POOL[nd](input, sizes, return_indices=True)
    position = _global_position(index, input.shape[input.ndim - nd :], axis, group_name, length)
    return _pick_across_ranks(local, position, True, False, group_name)


def _global_position(index, local_spatial, axis: int, group_name: str, length: int | None):
    """Local flat spatial indices -> flat indices in the global spatial plane."""
    domain = Domain.from_group(group_name)
    n = domain.global_length(local_spatial[axis], length)
    start = domain.bounds(n)[0]
    global_spatial = list(local_spatial)
    global_spatial[axis] = n
    coords, rest = [], index
    for size in reversed(local_spatial):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    coords[axis] = coords[axis] + start
    flat = torch.zeros_like(index)
    for c, size in zip(coords, global_spatial):
        flat = flat * size + c
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


def softmax(input, dim, dtype=None, *, shard_dim: int, group_name: str, length: int | None = None):
    """``F.softmax`` along ``dim == shard_dim``: exp(x - max) / sum, with a global max and sum."""
    x, xs, top, total = _softmax_parts(input, dim, dtype, group_name)
    return (torch.exp(xs - top) / total).to(x.dtype)


def log_softmax(input, dim, dtype=None, *, shard_dim: int, group_name: str, length: int | None = None):
    """``F.log_softmax`` along ``dim == shard_dim``."""
    x, xs, top, total = _softmax_parts(input, dim, dtype, group_name)
    return (xs - top - torch.log(total)).to(x.dtype)


# -- losses over pixels --------------------------------------------------------


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


def _finish_loss(pointwise, reduction: str, denominator, group_name: str):
    """Reduce a per-element loss over the whole domain: one all_reduce.

    ``denominator`` is this rank's share of what ``'mean'`` divides by (a tensor:
    summed along with the loss), or ``None`` for the global element count (this
    rank's count, summed along with the loss: shards may differ in length).
    """
    acc = _acc_dtype(pointwise.dtype)
    local = pointwise.sum(dtype=acc)
    if reduction == "sum":
        return all_reduce_sum(local, group_name).to(pointwise.dtype)
    if denominator is None:
        total, count = _sum_with_count(local, pointwise.numel(), group_name)
        return (total / count).to(pointwise.dtype)
    total = all_reduce_sum(torch.stack([local, denominator.to(acc)]), group_name)
    return (total[0] / total[1]).to(pointwise.dtype)


def _elementwise_loss(fn, input, target, reduction, weight, group_name, **options):
    if weight is not None:
        pointwise = fn(input, target, reduction="none", weight=weight, **options)
        return _finish_loss(pointwise, reduction, weight.sum() if reduction == "mean" else None, group_name)
    return _finish_loss(fn(input, target, reduction="none", **options), reduction, None, group_name)


def mse_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    weight=None,
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.mse_loss`` over the whole domain ('mean': global sum over global count, or over ``sum(weight)``)."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.mse_loss, input, target, reduction, weight, group_name)


def l1_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    weight=None,
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.l1_loss`` over the whole domain."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.l1_loss, input, target, reduction, weight, group_name)


def smooth_l1_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    beta=1.0,
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.smooth_l1_loss`` over the whole domain."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.smooth_l1_loss, input, target, reduction, None, group_name, beta=beta)


def huber_loss(
    input,
    target,
    reduction="mean",
    delta=1.0,
    weight=None,
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.huber_loss`` over the whole domain."""
    return _elementwise_loss(F.huber_loss, input, target, reduction, weight, group_name, delta=delta)


def _class_denominator(target, weight, ignore_index: int):
    """What ``'mean'`` divides by for class-index targets: the (weighted) count of non-ignored targets."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum()
    return torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.cross_entropy`` with class dim 1 and spatial targets, over the whole domain.

    ``'mean'`` is ``sum(per-pixel loss) / D`` with ``D`` the sum of the target
    classes' weights over non-ignored pixels (class-index targets) or the pixel
    count (probability targets); checked against torch for weights, ignore_index
    and label smoothing.  ``D`` is summed over ranks in the same all_reduce.
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    pointwise = F.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    probabilities = target.dtype.is_floating_point
    denominator = None if reduction != "mean" or probabilities else _class_denominator(target, weight, ignore_index)
    return _finish_loss(pointwise, reduction, denominator, group_name)


def nll_loss(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    *,
    shard_dim: int,
    group_name: str,
    length: int | None = None,
):
    """``F.nll_loss`` with class dim 1 and spatial targets, over the whole domain."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    pointwise = F.nll_loss(input, target, weight, ignore_index=ignore_index, reduction="none")
    denominator = _class_denominator(target, weight, ignore_index) if reduction == "mean" else None
    return _finish_loss(pointwise, reduction, denominator, group_name)
