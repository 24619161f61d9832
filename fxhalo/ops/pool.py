"""Pooling over a sharded spatial dim: max and average pooling, 1-D to 3-D.

Max and average pooling are windowed ops with the geometry of shared/DESIGN.md
section 4, except that ``ceil_mode`` changes the output length (:meth:`PoolDim.out_length`).
A rank that owns output rows ``[c, e)`` reads input rows
``[c*s - p, (e-1)*s - p + d(k-1) + 1)``; one halo exchange fetches them, with rows
past the global edges filled as the op pads (``-inf`` for max, zeros for average),
and the local op then runs with no padding along the sharded dim.  Two details
are not visible in the window alone:

* **Average divisors.** With ``count_include_pad`` torch counts padded cells only
  inside the implicit padding ``[-p, N + p)``, not the cells a ``ceil_mode`` window
  runs past it; without it, only real cells.  Both counts depend on where the
  window lies in the *global* tensor, so the edge rows' divisors are computed
  from the global geometry (:meth:`PoolDim.divisor`) and the local result,
  which divided by the full kernel, is rescaled.
* **Max indices** refer to the flattened spatial index of the *global* input,
  as on one device.  The local op's indices are slab indices, translated by the
  slab's first global row.  A window whose real cells are all ``-inf`` keeps
  torch's initial index, its first real cell, and gets its gradient; on an edge
  rank fill rows come first, so such picks are moved back to the first real cell
  and the values re-read through the corrected indices.

Adaptive pooling lives in :mod:`fxhalo.ops.adaptive_pool`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..geometry import split_rows
from ..halo import Edge, HaloPlan, halo_exchange, takes_received_rows
from .rows import along, ceil_div, covers_only_own_rows, halo_plan, ints, spatial_index

__all__ = [
    "PoolDim",
    "PoolPlan",
    "plan_pool",
    "default_stride",
    "global_indices",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
]

_ZEROS = Edge()  # an average pool's fill past the edges, as the halo observers hear of it
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# -- windowed pooling -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolDim:
    """One dim of a max or average pool."""

    kernel: int
    stride: int
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1)

    def out_length(self, n: int) -> int:
        """torch's pooling output length: ``ceil_mode`` rounds up, but the last window must
        start inside the input or its left padding."""
        s, p = self.stride, self.padding
        m = (n + 2 * p - self.span - 1 + (s - 1 if self.ceil_mode else 0)) // s + 1
        if self.ceil_mode and (m - 1) * s >= n + p:
            m -= 1
        return m

    def needed(self, c: int, e: int) -> tuple[int, int]:
        """Global input rows ``[start, stop)`` read by output rows ``[c, e)`` (padding included)."""
        return c * self.stride - self.padding, (e - 1) * self.stride - self.padding + self.span + 1

    def first_real_row(self, o: int) -> int:
        """The first row of window ``o`` inside the tensor (torch's initial max index)."""
        start = o * self.stride - self.padding
        return start if start >= 0 else start + ceil_div(-start, self.dilation) * self.dilation

    def divisor(self, o: int, n: int, count_include_pad: bool) -> int:
        """How many cells torch divides window ``o`` by, along this dim (average pooling)."""
        start = o * self.stride - self.padding
        stop = min(start + self.kernel, n + self.padding)  # padding counts, cells past it do not
        if count_include_pad:
            return stop - start
        return min(stop, n) - max(start, 0)


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """A max or average pool on one rank.

    ``local``: the op applied to the local shard as it is gives this rank's output rows
    (then ``halo`` is None).  ``start`` is the global row of the first row the local op
    sees.  ``rescale`` holds ``kernel / divisor`` per output row when an average's edge
    divisors differ from the kernel; ``first_real`` the first real row of each window,
    for max indices on ranks whose slab begins with fill rows.
    """

    n: int
    m: int
    rows: tuple[int, int]
    local: bool
    start: int
    halo: HaloPlan | None
    rescale: tuple[float, ...] | None
    first_real: tuple[int, ...] | None


def _pool_is_local(sdim: PoolDim, in_part, out_part, needs, n: int) -> bool:
    """Does the op, run on each rank's own rows with its own padding, give that rank's outputs?

    It does when the local windows line up with the global ones (``a == c*s``), the
    local output length is right, and no window reads a real row of another rank.
    Then no padding is read that the global op would not read as padding too.
    """
    if not covers_only_own_rows(in_part, needs, n):
        return False
    return all(a == c * sdim.stride and sdim.out_length(b - a) == e - c for (a, b), (c, e) in zip(in_part, out_part))


@functools.lru_cache(maxsize=1024)
def plan_pool(
    sdim: PoolDim, domain: Domain, n: int, fill: float, count_include_pad: bool | None, what: str
) -> PoolPlan:
    """Plan a max pool (``count_include_pad=None``) or an average pool over ``n`` global rows."""
    m = sdim.out_length(n)
    in_part, out_part = split_rows(domain, n, m, what)
    needs = tuple(sdim.needed(c, e) for c, e in out_part)
    c, e = out_part[domain.rank]
    if _pool_is_local(sdim, in_part, out_part, needs, n):
        return PoolPlan(n, m, (c, e), True, in_part[domain.rank][0], None, None, None)
    halo = halo_plan(in_part, needs, domain.rank, Edge("constant", fill))
    start = needs[domain.rank][0]
    rescale = first_real = None
    if count_include_pad is not None:
        factors = tuple(sdim.kernel / sdim.divisor(o, n, count_include_pad) for o in range(c, e))
        rescale = factors if any(f != 1.0 for f in factors) else None
    elif start < 0:
        first_real = tuple(sdim.first_real_row(o) for o in range(c, e))
    return PoolPlan(n, m, (c, e), False, start, halo, rescale, first_real)


def default_stride(stride, kernel_size):
    """torch's default stride is the kernel (spelled ``None`` or ``[]``)."""
    return kernel_size if stride is None or (isinstance(stride, (list, tuple)) and not stride) else stride


def _domain_and_dim(input, nd, shard_dim, group_name):
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    dim = domain.dim_of(input.ndim)
    return domain, dim, spatial_index(input.ndim, nd, dim)


def _split_flat(idx: torch.Tensor, inner: int, rows: int):
    """A flattened spatial index over ``rows`` rows of ``inner`` cells -> ``(outer, row, cell)``."""
    block = rows * inner
    outer, rest = idx // block, idx % block
    return outer, rest // inner, rest % inner


def _join_flat(outer, row, cell, inner: int, rows: int) -> torch.Tensor:
    return (outer * rows + row) * inner + cell


def global_indices(idx: torch.Tensor, inner: int, slab_rows: int, n: int, start: int) -> torch.Tensor:
    """Flattened spatial indices into a slab -> flattened indices into the global input.

    The slab has ``slab_rows`` rows along the sharded dim, the first at global row
    ``start``; the global input has ``n``.  The dims after the sharded one (``inner``
    cells per row) keep their sizes, so only the row moves.
    """
    outer, row, cell = _split_flat(idx, inner, slab_rows)
    return _join_flat(outer, row + start, cell, inner, n)


def _first_real_cells(
    x: torch.Tensor, dim: int, nd: int, values: torch.Tensor, idx: torch.Tensor, start: int, first_real: tuple[int, ...]
):
    """Point windows that picked a fill row back at their first real row, and re-read the values.

    The fill rows before the tensor are ``-inf``: a window whose real cells are all
    ``-inf`` picks its first cell, which on this rank is a fill row, while torch picks
    (and sends the gradient to) the window's first real cell.  Re-reading the values
    through the corrected indices routes the gradient there too.
    """
    inner = _inner(x, dim)
    outer, row, cell = _split_flat(idx, inner, x.shape[dim])
    fixed = along([r - start for r in first_real], dim, idx.ndim, idx)
    idx = _join_flat(outer, torch.where(row + start < 0, fixed, row), cell, inner, x.shape[dim])
    planes = x.flatten(-nd)
    values = planes.gather(-1, idx.flatten(-nd)).view_as(values)
    return values, idx


def _inner(x: torch.Tensor, dim: int) -> int:
    """Cells per row of the flattened spatial index: the product of the dims after ``dim``."""
    inner = 1
    for size in x.shape[dim + 1 :]:
        inner = inner * size
    return inner


def _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes):
    axes = each_axis(axes)
    if len(axes) > 1:
        return _max_pool_on_axes(nd, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes)
    shard_dim, group_name, length = axes[0]
    domain, dim, sdim = _domain_and_dim(input, nd, shard_dim, group_name)
    op = _MAX[nd]
    stride = default_stride(stride, kernel_size)
    if sdim is None:  # batch or channel sharded: every plane is pooled on its own rank
        return op(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    k, s, p, d = ints(kernel_size, nd), ints(stride, nd), ints(padding, nd), ints(dilation, nd)
    plan = plan_pool(
        PoolDim(k[sdim], s[sdim], p[sdim], d[sdim], bool(ceil_mode)),
        domain,
        domain.global_length(input.shape[dim], length),
        float("-inf"),
        None,
        f"max_pool{nd}d (kernel {k}, stride {s}, padding {p}, dilation {d})",
    )
    if plan.local:
        x, pads = input, p
    else:
        x = halo_exchange(input, dim, plan.halo, group_name, edge="-inf")
        pads = tuple(0 if i == sdim else v for i, v in enumerate(p))
    if plan.first_real is None:
        out = op(x, k, s, pads, d, ceil_mode, return_indices)
        if not return_indices:
            return out
        values, idx = out
    else:  # fill rows before the tensor: correct the picks of all -inf windows
        values, idx = op(x, k, s, pads, d, ceil_mode, True)
        values, idx = _first_real_cells(x, dim, nd, values, idx, plan.start, plan.first_real)
        if not return_indices:
            return values
    return values, global_indices(idx, _inner(x, dim), x.shape[dim], plan.n, plan.start)


def _max_pool_on_axes(nd, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes):
    """A max pool on several sharded dims: one exchange of the block's halo (:mod:`fxhalo.block_halo`),
    fill past the global edges ``-inf`` along every dim, then torch's op without padding along the
    exchanged dims.  The 1-D corrections apply dim by dim: a window whose real cells are all ``-inf``
    picks its first cell, a fill one where the block's halo begins before the tensor, while torch picks
    (and sends the gradient to) its first real cell; and the indices become global, each sharded dim
    moved by its block's first row."""
    stride = default_stride(stride, kernel_size)
    k, s, p, d = ints(kernel_size, nd), ints(stride, nd), ints(padding, nd), ints(dilation, nd)
    exchanges, plans = {}, []
    for a, (shard_dim, group_name, length) in enumerate(axes):
        domain, dim, sdim = _domain_and_dim(input, nd, shard_dim, group_name)
        if sdim is None:
            continue
        plan = plan_pool(
            PoolDim(k[sdim], s[sdim], p[sdim], d[sdim], bool(ceil_mode)),
            domain,
            domain.global_length(input.shape[dim], length),
            float("-inf"),
            None,
            f"max_pool{nd}d (kernel {k}, stride {s}, padding {p}, dilation {d})",
        )
        if not plan.local:
            exchanges[a] = (dim, plan.halo, "-inf")
        plans.append((dim, sdim, plan))
    x = exchange_on_axes(input, axes, exchanges)
    pads = tuple(0 if any(i == sdim and not plan.local for _, sdim, plan in plans) else v for i, v in enumerate(p))
    fixes = [(dim, plan) for dim, _, plan in plans if plan.first_real is not None]
    if not return_indices and not fixes:
        return _MAX[nd](x, k, s, pads, d, ceil_mode)
    values, idx = _MAX[nd](x, k, s, pads, d, ceil_mode, True)
    for dim, plan in fixes:
        values, idx = _first_real_cells(x, dim, nd, values, idx, plan.start, plan.first_real)
    if not return_indices:
        return values
    space = list(x.shape)  # the index space, each sharded dim made global in turn
    for dim, _, plan in plans:
        inner = math.prod(space[dim + 1 :])
        idx = global_indices(idx, inner, space[dim], plan.n, plan.start)
        space[dim] = plan.n
    return values, idx


def _avg_pool(nd, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, axes):
    stride = default_stride(stride, kernel_size)
    extra = () if nd == 1 else (divisor_override,)  # avg_pool1d has no divisor_override

    def op(x, pads):
        return _AVG[nd](x, kernel_size, stride, pads, ceil_mode, count_include_pad, *extra)

    k, s, p = ints(kernel_size, nd), ints(stride, nd), ints(padding, nd)
    # One exchange for every sharded dim at once (fxhalo.block_halo: the corners come along).
    # The local windows lie inside the slab and are divided by the full kernel along each exchanged dim;
    # torch's divisor is a product of one count per dim, so each dim's correction multiplies in.
    pads, rescales, exchanges = list(p), [], {}
    for a, (shard_dim, group_name, length) in enumerate(each_axis(axes)):
        domain, dim, sdim = _domain_and_dim(input, nd, shard_dim, group_name)
        if sdim is None:  # batch or channel sharded: every plane is pooled on its own rank
            continue
        plan = plan_pool(
            PoolDim(k[sdim], s[sdim], p[sdim], 1, bool(ceil_mode)),
            domain,
            domain.global_length(input.shape[dim], length),
            0.0,
            bool(count_include_pad),
            f"avg_pool{nd}d (kernel {k}, stride {s}, padding {p})",
        )
        if plan.local:
            continue
        exchanges[a] = (dim, plan.halo, _ZEROS)
        pads[sdim] = 0
        if plan.rescale is not None and divisor_override is None:
            rescales.append((plan.rescale, dim))
    out = op(exchange_on_axes(input, axes, exchanges), tuple(pads))
    for rescale, dim in rescales:
        out = out * along(rescale, dim, out.ndim, out)
    return out


# -- the public kernels, one per torch op ---------------------------------------------


@takes_received_rows
@several_axes
def max_pool1d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    return_indices=False,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.max_pool1d`` of a slab sharded along ``shard_dim``; indices refer to the global input."""
    return _max_pool(1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes)


@takes_received_rows
@several_axes
def max_pool2d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    return_indices=False,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.max_pool2d`` of a slab sharded along ``shard_dim``; indices refer to the global input."""
    return _max_pool(2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes)


@takes_received_rows
@several_axes
def max_pool3d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    return_indices=False,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.max_pool3d`` of a slab sharded along ``shard_dim``; indices refer to the global input."""
    return _max_pool(3, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, axes)


@takes_received_rows
@several_axes
def avg_pool1d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.avg_pool1d`` of a slab sharded along ``shard_dim``."""
    return _avg_pool(1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None, axes)


@takes_received_rows
@several_axes
def avg_pool2d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.avg_pool2d`` of a slab sharded along ``shard_dim``."""
    return _avg_pool(2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, axes)


@takes_received_rows
@several_axes
def avg_pool3d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.avg_pool3d`` of a slab sharded along ``shard_dim``."""
    return _avg_pool(3, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, axes)
