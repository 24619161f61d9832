"""``F.interpolate`` along a sharded spatial dim, in global coordinates.

Running ``F.interpolate`` on a slab does not reproduce the global result: torch maps
output row ``o`` to a source coordinate through the *global* sizes (or the user's
scale factor), and clamps at the *global* edges.  So the sharded dim is resampled
explicitly:

1. :func:`source_taps` maps every global output row to the global input rows it reads
   and their weights, as torch does:

   * the output length is ``size``, or ``floor(N * scale_factor)``;
   * the coordinate scale is ``1/scale_factor`` when a scale factor is given and
     ``recompute_scale_factor`` is not True (torch's default), else ``N/M``; with
     ``align_corners=True`` it is ``(N-1)/(M-1)`` whatever was given;
   * ``linear``: source ``scale*(o+0.5)-0.5`` (``scale*o`` with ``align_corners``),
     clamped at 0, its floor and the next row (the last row repeats at the end),
     weights ``1-t, t``; a dim whose length does not change is copied, whatever
     the scale factor says;
   * ``cubic``: the same coordinate unclamped, rows ``floor-1 .. floor+2`` clamped
     to ``[0, N)``, torch's cubic convolution weights (``A = -0.75``);
   * ``nearest`` / ``nearest-exact``: torch's 1-D, 2-D and 3-D CPU kernels round the
     index ``floor(o*scale)`` (``floor((o+0.5)*scale)``) through different float
     paths (the 2-D one also short-cuts scales 1 and 2), which no formula matches on
     every size (nor do its float and double kernels agree).  So the index table of
     the global dim is asked of torch itself, once per plan: the op on a ramp
     ``0..N-1`` of the same rank and float type.
2. The rows each rank's outputs read become its halo (``plan_halo``); they always lie
   inside the tensor, since torch clamps rather than pads.
3. The rank gathers its output rows from the slab with ``index_select`` and sums them
   with their weights in float32 or float64, as torch's CPU kernels do.  The other
   spatial axes are left to ``F.interpolate`` itself, with the sharded dim kept as it
   is (scale 1, which torch maps to the identity).

A resize whose every rank reads only its own rows, and for which the op on the local
shard gives the same rows and weights (nearest x2, say), needs no exchange.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, one_axis, several_axes
from ..geometry import Unsplittable, split_rows
from ..halo import HaloPlan, halo_exchange, takes_received_rows
from .rows import along, halo_plan, spatial_index

__all__ = ["MODES", "DimResize", "InterpPlan", "dim_resize", "source_taps", "plan_interpolate", "interpolate"]

MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")
_NEAREST = ("nearest", "nearest-exact")
_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class DimResize:
    """One dim: ``n_in`` rows to ``n_out``; ``scale`` is the user's scale factor when torch
    uses it for source coordinates (``None``: the size ratio)."""

    n_in: int
    n_out: int
    scale: float | None = None


def _per_dim(value, nd: int) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value] * nd


def dim_resize(n: int, size, scale_factor, recompute_scale_factor, sdim: int, nd: int) -> DimResize:
    """How ``F.interpolate(size=..., scale_factor=...)`` resizes spatial dim ``sdim`` of length ``n``."""
    if size is not None:
        return DimResize(n, int(_per_dim(size, nd)[sdim]))
    s = float(_per_dim(scale_factor, nd)[sdim])
    return DimResize(n, int(n * s), None if recompute_scale_factor else s)  # torch truncates n*s


# -- source rows and weights of every output row ----------------------------------


def _nearest_rows(mode: str, nd: int, sdim: int, r: DimResize, double: bool, device: str) -> np.ndarray:
    """torch's own index table for this dim: the op on a ramp of the same rank.

    The ramp has the op's float type too (float64, else float32, which holds every
    row index below 2**24): torch's double kernels round the index differently.
    """
    shape = [1, 1] + [1] * nd
    shape[2 + sdim] = r.n_in
    if r.scale is None:
        sizes = [1] * nd
        sizes[sdim] = r.n_out
        how = {"size": sizes}
    else:
        scales = [1.0] * nd
        scales[sdim] = r.scale
        how = {"scale_factor": scales}
    # The plan may be made while a fake or tracing mode is active (AOTAutograd tracing
    # the kernel); the table is plain data, computed on real tensors outside those modes.
    with torch.no_grad(), _disable_current_modes():
        ramp = torch.arange(r.n_in, dtype=torch.float64 if double else torch.float32, device=device).view(shape)
        table = F.interpolate(ramp, mode=mode, **how).flatten().to("cpu", torch.int64)
    return table.numpy()[:, None]


def _coordinate_scale(r: DimResize, align_corners: bool, t):
    """torch's ``area_pixel_compute_scale`` in the op's float type ``t``."""
    if align_corners:
        return t(r.n_in - 1) / t(r.n_out - 1) if r.n_out > 1 else t(0)
    if r.scale is not None and r.scale > 0:
        return t(1.0 / r.scale)
    return t(r.n_in) / t(r.n_out)


def _source_coordinates(r: DimResize, align_corners: bool, cubic: bool, t) -> np.ndarray:
    """torch's ``area_pixel_compute_source_index`` for every output row."""
    scale = _coordinate_scale(r, align_corners, t)
    o = np.arange(r.n_out).astype(t)
    if align_corners:
        return scale * o
    real = scale * (o + t(0.5)) - t(0.5)
    return real if cubic else np.maximum(real, t(0))


def _floor_and_fraction(real: np.ndarray, n: int, t):
    """torch's ``guard_index_and_lambda``: the row below (at most ``n - 1``) and the fraction past it."""
    below = np.minimum(np.floor(real).astype(np.int64), n - 1)
    return below, np.clip(real - below.astype(t), t(0), t(1))


def _linear_taps(r: DimResize, align_corners: bool, t):
    if r.n_out == r.n_in:  # torch copies a dim whose length does not change, whatever the scale
        rows = np.arange(r.n_in)
        return np.stack([rows, rows], 1), np.stack([np.ones(r.n_in, t), np.zeros(r.n_in, t)], 1)
    below, frac = _floor_and_fraction(_source_coordinates(r, align_corners, False, t), r.n_in, t)
    above = below + (below < r.n_in - 1)
    return np.stack([below, above], 1), np.stack([t(1) - frac, frac], 1)


def _cubic_weights(frac: np.ndarray, t) -> np.ndarray:
    a = t(_CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + t(2)) * x - (a + t(3))) * x * x + t(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - t(5) * a) * x + t(8) * a) * x - t(4) * a

    return np.stack([far(frac + t(1)), near(frac), near(t(1) - frac), far(t(2) - frac)], 1)


def _cubic_taps(r: DimResize, align_corners: bool, t):
    below, frac = _floor_and_fraction(_source_coordinates(r, align_corners, True, t), r.n_in, t)
    rows = np.clip(below[:, None] + np.arange(-1, 3)[None, :], 0, r.n_in - 1)  # clamp, not zeros
    return rows, _cubic_weights(frac, t)


@functools.lru_cache(maxsize=256)
def source_taps(mode: str, nd: int, sdim: int, r: DimResize, align_corners: bool, double: bool, device: str = "cpu"):
    """``(rows, weights)``: for every output row of ``r``, the input rows it reads and their
    weights (``weights`` is None for nearest modes).  Arrays of shape ``(n_out, taps)``."""
    t = np.float64 if double else np.float32  # torch's opmath type
    if mode in _NEAREST:
        rows, weights = _nearest_rows(mode, nd, sdim, r, double, device), None
    elif mode == "bicubic":
        rows, weights = _cubic_taps(r, align_corners, t)
    else:
        rows, weights = _linear_taps(r, align_corners, t)
    for a in (rows, weights):
        if a is not None:
            a.flags.writeable = False  # cached and shared
    return rows, weights


# -- the plan of one rank ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InterpPlan:
    """``F.interpolate`` along the sharded dim on one rank.

    ``local``: every rank reads only its own rows, and the op on its shard (with its
    share of the output) maps them exactly as the global op does: no exchange, just the
    op.  Otherwise ``index[t][j]`` is the slab row of tap ``t`` of output row ``j`` and
    ``weights[t][j]`` its weight (``None`` for nearest modes).
    """

    n: int
    m: int
    rows: tuple[int, int]
    local: bool
    halo: HaloPlan | None
    index: tuple[tuple[int, ...], ...] = ()
    weights: tuple[tuple[float, ...], ...] | None = None


def _local_resize(r: DimResize, rows: int, out_rows: int) -> DimResize | None:
    """What the op does on a shard of ``rows`` rows when asked for ``out_rows`` rows, if it can."""
    if r.scale is None:
        return DimResize(rows, out_rows)
    local = DimResize(rows, int(rows * r.scale), r.scale)  # a scale factor fixes the local length
    return local if local.n_out == out_rows else None


def _is_local(mode, nd, sdim, r, align_corners, double, device, in_part, out_part, rows, weights) -> bool:
    for (a, b), (c, e) in zip(in_part, out_part):
        local = _local_resize(r, b - a, e - c)
        if local is None:
            return False
        l_rows, l_weights = source_taps(mode, nd, sdim, local, align_corners, double, device)
        if not np.array_equal(l_rows + a, rows[c:e]):
            return False
        if weights is not None and not np.array_equal(l_weights, weights[c:e]):
            return False
    return True


@functools.lru_cache(maxsize=256)
def plan_interpolate(
    mode: str,
    nd: int,
    sdim: int,
    r: DimResize,
    align_corners: bool,
    double: bool,
    device: str,
    domain: Domain,
    what: str,
    explicit: bool = False,
) -> InterpPlan:
    """The plan of one rank; ``explicit``: always the gathered taps (no local shortcut), as a kernel that
    resamples several sharded dims one after the other needs."""
    in_part, out_part = split_rows(domain, r.n_in, r.n_out, what)
    rows, weights = source_taps(mode, nd, sdim, r, align_corners, double, device)
    c, e = out_part[domain.rank]
    if not explicit and _is_local(mode, nd, sdim, r, align_corners, double, device, in_part, out_part, rows, weights):
        return InterpPlan(r.n_in, r.n_out, (c, e), True, None)
    needs = tuple((int(rows[c0:e0].min()), int(rows[c0:e0].max()) + 1) for c0, e0 in out_part)
    start = needs[domain.rank][0]
    index = tuple(tuple(int(i) - start for i in rows[c:e, k]) for k in range(rows.shape[1]))
    w = None if weights is None else tuple(tuple(float(v) for v in weights[c:e, k]) for k in range(weights.shape[1]))
    return InterpPlan(r.n_in, r.n_out, (c, e), False, halo_plan(in_part, needs, domain.rank), index, w)


# -- the kernel ----------------------------------------------------------------------------


def _resample_rows(x: torch.Tensor, dim: int, plan: InterpPlan) -> torch.Tensor:
    """This rank's output rows along ``dim`` from the slab ``x``: gathered taps, weighted and summed."""
    taps = [torch.tensor(ix, dtype=torch.int64, device=x.device) for ix in plan.index]
    if plan.weights is None:
        return x.index_select(dim, taps[0])
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # torch's opmath
    out = None
    for ix, w in zip(taps, plan.weights):
        term = x.index_select(dim, ix).to(acc_dtype) * along(w, dim, x.ndim, x, acc_dtype)
        out = term if out is None else out + term
    return out.to(x.dtype)


def _is_identity(n: int, r: DimResize, align_corners: bool) -> bool:
    """Does torch leave a dim unchanged?  Same length and a coordinate scale of exactly 1."""
    return int(r.n_out) == int(n) and (align_corners or r.scale is None or r.scale == 1.0)


def _other_axes(x, sdims, nd, size, scale_factor, recompute, mode, align_corners):
    """Resample every spatial dim but the sharded ones (spatial indices ``sdims``) with torch's own op
    (a sharded dim gets scale 1 or its current size, which torch treats as the identity)."""
    spatial = list(x.shape[2:])
    others = [dim_resize(spatial[i], size, scale_factor, recompute, i, nd) for i in range(nd)]
    if all(_is_identity(spatial[i], others[i], align_corners) for i in range(nd) if i not in sdims):
        return x
    align = align_corners if mode not in _NEAREST else None
    if size is not None or recompute:
        sizes = [spatial[i] if i in sdims else others[i].n_out for i in range(nd)]
        return F.interpolate(x, size=sizes, mode=mode, align_corners=align)
    scales = [1.0 if i in sdims else float(_per_dim(scale_factor, nd)[i]) for i in range(nd)]
    return F.interpolate(x, scale_factor=scales, mode=mode, align_corners=align)


def _local_op(input, sdim, nd, plan, size, scale_factor, mode, align_corners, recompute):
    """The op on the local shard, asked for this rank's share of the output."""
    align = align_corners if mode not in _NEAREST else None
    if size is None and not recompute:  # the scale factor gives the local length (checked by the plan)
        return F.interpolate(input, scale_factor=scale_factor, mode=mode, align_corners=align)
    spatial = list(input.shape[2:])
    sizes = [dim_resize(spatial[i], size, scale_factor, recompute, i, nd).n_out for i in range(nd)]
    sizes[sdim] = plan.rows[1] - plan.rows[0]
    return F.interpolate(input, size=sizes, mode=mode, align_corners=align)


def _several_axes_interpolate(args, kwargs) -> bool:
    """A mode fxhalo splits, without antialias: what :func:`_interpolate_on_axes` handles."""
    mode, antialias = args[3], args[6]
    return mode in MODES and not antialias


def _interpolate_on_axes(input, size, scale_factor, mode, align_corners, recompute, axes):
    """:func:`interpolate` on several sharded dims: the taps of every sharded dim in one exchange (the
    block's halo, :mod:`fxhalo.block_halo`), each sharded dim resampled from them in turn, then torch
    resamples the others.  Linear, cubic and nearest resampling are separable, so the dims may go one
    at a time.  A ``size`` is global along every sharded dim, as in 1-D."""
    nd = input.ndim - 2
    align = bool(align_corners) if mode not in _NEAREST else False
    exchanges, resamples = {}, []
    for a, (shard_dim, group_name, length) in enumerate(axes):
        domain = Domain.from_group(group_name, shard_dim=shard_dim)
        dim = domain.dim_of(input.ndim)
        sdim = spatial_index(input.ndim, nd, dim)
        if sdim is None:
            continue
        what = f"interpolate (mode {mode!r}, size {size}, scale_factor {scale_factor})"
        resize = dim_resize(domain.global_length(input.shape[dim], length), size, scale_factor, recompute, sdim, nd)
        plan = plan_interpolate(
            mode, nd, sdim, resize, align, input.dtype == torch.float64, input.device.type, domain, what, True
        )
        exchanges[a] = (dim, plan.halo, "clamp")
        resamples.append((dim, sdim, plan))
    x = exchange_on_axes(input, axes, exchanges)
    for dim, _, plan in resamples:
        x = _resample_rows(x, dim, plan)
    return _other_axes(x, {sdim for _, sdim, _ in resamples}, nd, size, scale_factor, recompute, mode, align)


@takes_received_rows
@several_axes(when=_several_axes_interpolate)
def interpolate(
    input,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.interpolate`` of a slab sharded along ``shard_dim``: this rank's rows of the global result.

    ``size`` along the sharded dim is the *global* output length.  ``antialias`` and
    modes other than :data:`MODES` are refused (raise :class:`~fxhalo.errors.FxHaloError`).
    """
    if len(axes) > 1:
        return _interpolate_on_axes(
            input, size, scale_factor, mode, align_corners, recompute_scale_factor, each_axis(axes)
        )
    shard_dim, group_name, length = one_axis(axes)
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    nd = input.ndim - 2
    dim = domain.dim_of(input.ndim)
    sdim = spatial_index(input.ndim, nd, dim)
    if sdim is None:  # batch or channel sharded: every plane is resized on its own rank
        return F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    what = f"interpolate (mode {mode!r}, size {size}, scale_factor {scale_factor})"
    if mode not in MODES or antialias:
        raise Unsplittable(
            what, "uses antialias or a mode fxhalo does not split", f"use one of {MODES} without antialias"
        )
    align = bool(align_corners) if mode not in _NEAREST else False
    resize = dim_resize(
        domain.global_length(input.shape[dim], length), size, scale_factor, recompute_scale_factor, sdim, nd
    )
    plan = plan_interpolate(
        mode, nd, sdim, resize, align, input.dtype == torch.float64, input.device.type, domain, what
    )
    if plan.local:
        return _local_op(input, sdim, nd, plan, size, scale_factor, mode, align, recompute_scale_factor)
    x = halo_exchange(input, dim, plan.halo, group_name, edge="clamp")  # source rows clamp at the edges

    def others(t):
        return _other_axes(t, {sdim}, nd, size, scale_factor, recompute_scale_factor, mode, align)

    if plan.rows[1] - plan.rows[0] <= x.shape[dim]:  # shrinking: the sharded dim first
        return others(_resample_rows(x, dim, plan))
    return _resample_rows(others(x), dim, plan)
