"""Transposed convolution over a sharded spatial dim: one halo exchange, the local op, a crop.

Along one dim, with kernel ``k``, dilation ``d``, stride ``s``, padding ``p`` and
output padding ``op``, a transposed conv scatters input row ``i`` into output rows
``i*s - p + t*d`` for ``t`` in ``[0, k)``.  (It is a conv of the input upsampled
with ``s - 1`` zero rows between rows, padded by ``d(k-1) - p`` before and
``d(k-1) - p + op`` after.)  So:

* the global output length is ``M = (N-1)*s - 2p + d(k-1) + op + 1``;
* output row ``o`` receives input rows ``i`` with ``o + p - d(k-1) <= i*s <= o + p``;
* a rank that owns output rows ``[c, e)`` needs input rows
  ``[ceil((c + p - d(k-1))/s), floor((e-1 + p)/s) + 1)``, clipped to the tensor
  (rows outside it do not exist: they contribute nothing).

The local ``conv_transpose`` with no padding along the sharded dim writes output
rows starting at global row ``A*s - p`` for a slab starting at input row ``A``.  A
few zero rows are added around the slab where needed so that its output covers
``[c, e)`` (when the first or last of those rows receives no input row at all,
e.g. a stride larger than the kernel), and the result is cropped to ``[c, e)``.
Zero rows and cropped rows carry no gradient, so the weight gradient summed over
ranks is exactly one device's.
"""

from __future__ import annotations

import dataclasses
import functools

import torch.nn.functional as F

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..geometry import split_rows
from ..halo import Edge, Fill, HaloPlan, takes_received_rows
from .rows import ceil_div, covers_only_own_rows, halo_plan, ints, spatial_index

__all__ = ["TransposedDim", "TransposedPlan", "plan_conv_transpose", "conv_transpose"]

_ZEROS = Edge()  # what lies past the edges of the zero-dilated input, for the halo observers
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclasses.dataclass(frozen=True)
class TransposedDim:
    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1)

    def out_length(self, n: int) -> int:
        return (n - 1) * self.stride - 2 * self.padding + self.span + self.output_padding + 1

    def contributing(self, c: int, e: int) -> tuple[int, int]:
        """Input rows ``[start, stop)`` that write into output rows ``[c, e)`` (may be empty)."""
        start = ceil_div(c + self.padding - self.span, self.stride)
        stop = (e - 1 + self.padding) // self.stride + 1
        return start, max(start, stop)

    def first_out(self, a: int) -> int:
        """Global output row of the first row of an unpadded transposed conv of rows from ``a``."""
        return a * self.stride - self.padding


@dataclasses.dataclass(frozen=True)
class TransposedPlan:
    """A transposed conv on one rank.

    ``local``: the op on the local shard as it is gives this rank's outputs (``halo`` is
    None).  Otherwise: exchange, prepend ``zeros_before`` and append ``zeros_after`` zero
    rows, run the op with no padding along the dim, and keep ``m_local`` rows from
    ``crop``.
    """

    n: int
    m: int
    rows: tuple[int, int]
    local: bool
    halo: HaloPlan | None
    zeros_before: int = 0
    zeros_after: int = 0
    crop: int = 0

    @property
    def m_local(self) -> int:
        return self.rows[1] - self.rows[0]


def _is_local(sdim: TransposedDim, in_part, out_part, needs, n: int) -> bool:
    """The op on each rank's own rows gives its outputs: aligned, the right length, no remote row read."""
    return covers_only_own_rows(in_part, needs, n) and all(
        sdim.first_out(a) == c and sdim.out_length(b - a) == e - c for (a, b), (c, e) in zip(in_part, out_part)
    )


@functools.lru_cache(maxsize=1024)
def plan_conv_transpose(sdim: TransposedDim, domain: Domain, n: int, what: str) -> TransposedPlan:
    m = sdim.out_length(n)
    in_part, out_part = split_rows(domain, n, m, what)
    needs = tuple(sdim.contributing(c, e) for c, e in out_part)
    c, e = out_part[domain.rank]
    if _is_local(sdim, in_part, out_part, needs, n):
        return TransposedPlan(n, m, (c, e), True, None)
    # Only rows inside the tensor exist; clip every rank's range to them.
    needs = tuple((min(max(s, 0), n), min(max(t, 0), n)) for s, t in needs)
    a, b = needs[domain.rank]
    if a == b:  # no input row reaches these outputs: an empty slab placed where they are
        a = b = max(0, ceil_div(c + sdim.padding, sdim.stride))
    before = max(0, ceil_div(sdim.first_out(a) - c, sdim.stride))
    after = max(0, ceil_div(e - 1 + sdim.padding - sdim.span, sdim.stride) - b + 1)
    if b - a + before + after == 0:
        after = 1  # torch needs at least one input row
    crop = c - sdim.first_out(a - before)
    return TransposedPlan(n, m, (c, e), False, halo_plan(in_part, needs, domain.rank), before, after, crop)


@takes_received_rows
@several_axes
def conv_transpose(
    input,
    weight,
    bias=None,
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.conv_transpose{1,2,3}d`` of a slab sharded along each of ``axes`` (a dim and its group's ranks).

    Gives this rank's rows of the one-device output (balanced partition of the global
    output length) along each sharded dim.  On several mesh axes the block's halo comes
    in one exchange (:mod:`fxhalo.block_halo`, corners included), and the output is
    cropped along each dim.
    """
    nd = weight.ndim - 2
    op = _CONV_T[nd]
    k = tuple(weight.shape[2:])
    s, p, op_, d = ints(stride, nd), ints(padding, nd), ints(output_padding, nd), ints(dilation, nd)
    pads, out_pads, crops, exchanges, around = list(p), list(op_), [], {}, []
    for a, (shard_dim, group_name, length) in enumerate(each_axis(axes)):
        domain = Domain.from_group(group_name, shard_dim=shard_dim)
        dim = domain.dim_of(input.ndim)
        sdim = spatial_index(input.ndim, nd, dim)
        if sdim is None:  # batch sharded: each sample is local (the rule refuses channel sharding)
            continue
        plan = plan_conv_transpose(
            TransposedDim(k[sdim], s[sdim], p[sdim], op_[sdim], d[sdim]),
            domain,
            domain.global_length(input.shape[dim], length),
            f"conv_transpose{nd}d (kernel {k}, stride {s}, padding {p}, output_padding {op_})",
        )
        if plan.local:
            continue
        exchanges[a] = (dim, plan.halo, _ZEROS)  # the input dilated by zeros
        around.append(Fill(dim, plan.zeros_before, 0.0, plan.zeros_after, 0.0))
        pads[sdim] = out_pads[sdim] = 0
        crops.append((dim, plan.crop, plan.m_local))
    x = exchange_on_axes(input, axes, exchanges)
    for zeros in around:
        x = zeros.restore(x)
    y = op(x, weight, bias, s, tuple(pads), tuple(out_pads), groups, d)
    for dim, crop, m_local in crops:
        y = y.narrow(dim, crop, m_local)
    return y
