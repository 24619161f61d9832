"""Mean and variance over dims that span the sharded dim, merged across ranks.

**Statistics.**  Mean and variance are merged from *shifted* local sums in float64;
see :func:`global_moments` for the scheme and the measurements that chose it.  The
norms (:mod:`fxhalo.ops.norm`) and ``var``/``std`` (:mod:`fxhalo.ops.reduce`) use
them: one ``all_reduce`` per op, or the statistics and a halo in one
``all_to_all_single`` (:func:`global_moments_with_rows`).
"""

from __future__ import annotations

import math

import torch

from ..domain import each_axis
from ..mesh import whole_group
from .collectives import all_reduce_sum, group_size

__all__ = [
    "global_moments",
    "global_moments_with_rows",
    "local_sums",
    "shifted_sums",
    "sums_from_shifted",
    "moments_from_sums",
    "normalize",
    "norm_coefficients",
    "apply_norm",
    "global_count",
]


# -- small helpers -------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half precision in float32, as torch's own reductions do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    sends: list[torch.Tensor],
    recv_numels: list[int],
    counts: tuple[int, ...],
    group_name: str,
):
    """:func:`global_moments` of ``x`` and the halo values that ``sends`` carries, in **one**
    ``all_to_all_single``.

    ``sends[q]`` (flat) is what rank ``q`` needs of this rank's rows, ``recv_numels[q]`` how many
    values come from ``q``: the parts of a halo exchange (:func:`fxhalo.halo.exchange_parts`, or a
    block's on a mesh, :func:`fxhalo.block_halo.block_parts`).  ``counts[q]`` is the number of
    elements per statistic on rank ``q``.  Every rank sends to every rank (itself included) its
    :func:`shifted_sums` ``(c, s1, s2)`` in the working dtype, followed by the values that rank
    needs; each rank then merges the statistics in float64, in rank order (so every rank gets the
    same bits, and the same accuracy as :func:`global_moments`).  The backward is the exchange's own:
    each copy's gradient goes back to its sender.  Returns ``(mean, m2, count, chunks)``, ``chunks[q]``
    the values received from ``q``.

    The statistics and the rows share one buffer, so ``x`` must be float32 or float64 (its own
    accumulation dtype), and so must the rows.
    """
    if _acc_dtype(x.dtype) != x.dtype or any(t.dtype != x.dtype for t in sends):
        raise AssertionError(f"statistics and rows share one buffer: {x.dtype} and {[t.dtype for t in sends]}")
    size = group_size(group_name)
    stats = torch.cat([t.reshape(-1) for t in shifted_sums(x, dims)])
    k = stats.numel()
    send_sizes = [k + t.numel() for t in sends]
    recv_sizes = [k + n for n in recv_numels]
    got = torch.ops._c10d_functional.all_to_all_single(
        torch.cat([torch.cat([stats, t]) for t in sends]), recv_sizes, send_sizes, group_name
    )
    got = torch.ops._c10d_functional.wait_tensor(got)
    keep = list(x.shape)
    for d in dims:
        keep[d] = 1
    total, chunks, at = None, [], 0
    for q in range(size):
        c, s1, s2 = got.narrow(0, at, k).view(3, *keep).unbind(0)
        sums = torch.stack(sums_from_shifted(c, s1, s2, counts[q]))
        total = sums if total is None else total + sums
        chunks.append(got.narrow(0, at + k, recv_numels[q]))
        at += recv_sizes[q]
    count = math.fsum(counts)
    mean, m2 = moments_from_sums(total, count)
    return mean, m2, count, chunks


def global_count(x: torch.Tensor, dims: tuple[int, ...], lengths: dict[int, int | None]) -> int | None:
    """Elements per statistic of a reduction over ``dims`` of the global tensor, whose sharded dims have
    the global ``lengths`` (``{dim: length}``; ``None`` when a length is not known)."""
    if any(lengths.get(d, 0) is None for d in dims):
        return None
    return math.prod(int(lengths[d]) if d in lengths else x.shape[d] for d in dims)


def over_axes(axes, ndim: int, shift: int = 0) -> tuple[dict[int, int | None], str]:
    """``({dim: global length}, group name)`` of statistics over the sharded dims of ``axes`` (kernel
    ``axes=``) of an ``ndim``-D input, each dim moved by ``shift`` (a grouping inserts a dim before them),
    and the group they are summed over: the axis's own, or the whole domain for several axes."""
    axes = each_axis(axes)
    return {a.dim % ndim + shift: a.global_length for a in axes}, whole_group(axes)


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


def normalize(x, mean, var, eps, weight=None, bias=None, per=None):
    """``(x - mean) / sqrt(var + eps) * weight + bias``, computed so that a large mean loses nothing.

    ``mean`` and ``var`` are float64 and broadcast against ``x``; ``weight`` and
    ``bias`` are already shaped to broadcast too.  :func:`norm_coefficients` turns them
    into three coefficients of shape ``per`` (default: their broadcast shape), and
    :func:`apply_norm` applies them to ``x``.
    """
    return apply_norm(x, norm_coefficients(x.dtype, mean, var, eps, weight, bias, per, x.numel()))


def norm_coefficients(dtype, mean, var, eps, weight=None, bias=None, per=None, numel=None):
    """``(hi, scale, offset)`` in ``dtype``'s accumulation dtype, each of shape ``per``, such that
    ``(x - hi) * scale + offset`` is the normalised ``x`` (:func:`apply_norm`).

    The float64 mean is split into ``hi + lo`` in the working dtype: ``x - hi`` is exact for data near
    the mean, and ``lo`` goes into ``offset``.

    When the coefficients are per statistic (``per`` has fewer elements than ``numel``, the size of
    the tensor they normalise), each is made a buffer of its own (:func:`_computed_once`).  Otherwise
    Inductor inlines their float64 arithmetic into the loop over every element, and for a group norm
    reads them through the channel's group (``c // (C / G)``), which its C++ backend does not
    vectorise: measured on SmallUNet 256² on 2 ranks, a fused normalisation and GELU took 7.4 ms a
    call that way, against 0.96 ms with the coefficients computed once (``docs/performance.md``).
    ``per`` lets a group norm ask for them per channel, ``(N, G, C / G, 1, ...)``.
    """
    acc = _acc_dtype(dtype)
    shapes = [mean.shape] + [t.shape for t in (weight, bias) if t is not None]
    per = tuple(torch.broadcast_shapes(*shapes, *(() if per is None else (per,))))
    hi = mean.to(acc)
    lo = (mean - hi.double()).to(acc)
    scale = torch.rsqrt(var + eps).to(acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    offset = -lo * scale
    if bias is not None:
        offset = offset + bias.to(acc)
    coefficients = (hi, scale, offset)
    if numel is not None and math.prod(per) < numel:
        coefficients = tuple(_computed_once(t, per) for t in coefficients)
    return coefficients


def apply_norm(x, coefficients):
    """``(x - hi) * scale + offset`` in the accumulation dtype, back in ``x``'s dtype."""
    hi, scale, offset = coefficients
    acc = _acc_dtype(x.dtype)
    return torch.addcmul(offset, x.to(acc) - hi, scale).to(x.dtype)


def _computed_once(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` broadcast to ``shape``, as a buffer that Inductor computes once.

    Inductor inlines a pointwise result into each of its readers; ``as_strided`` is the one
    lowering that needs its input realised first (torch's own CPU decomposition of
    ``native_group_norm`` uses it for the same reason).  The ``clone`` makes the input a fresh
    contiguous tensor, which ``as_strided`` then reads as it is: no view for it to see through.
    Eagerly this is a copy of ``numel(shape)`` values.
    """
    t = t.expand(shape).clone(memory_format=torch.contiguous_format)
    return t.as_strided(t.shape, t.stride())
