"""Ops that move whole rows along the sharded dim: ``F.pad``, ``torch.roll``, ``torch.flip``.

Each output row of these ops is one input row (or a fill row), so each is a pure
row mapping.  Rank ``r`` owns output rows ``[c, e)`` under the partition rule;
the mapping says which global input rows those are; one
:func:`~fxhalo.halo.halo_exchange` fetches exactly them:

* ``pad`` by ``(lo, hi)``: output row ``o`` is input row ``o - lo``; rows outside
  ``[0, N)`` come from the pad's mode at the global edges only (negative pads
  crop).  ``M = N + lo + hi``.
* ``roll`` by ``s``: output row ``o`` is input row ``(o - s) mod N``, a circular
  edge.  Each rank receives exactly ``s mod N`` rows (fewer when a shard is
  thinner): a ring shift, not a gather.
* ``flip``: output rows ``[c, e)`` are input rows ``[N - e, N - c)`` reversed.
  With even shards rank ``r`` swaps its whole shard with rank ``P - 1 - r``.

The same planners serve the rules (at compile time) and the kernels (at run
time), so both agree on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_halo import exchange_on_axes
from ..domain import Domain, ShardAxis, each_axis, several_axes
from ..geometry import split_rows
from ..halo import Edge, HaloPlan, plan_halo

__all__ = ["pad_entries", "pad_plan", "roll_shift", "roll_plan", "flip_plan", "pad", "roll", "flip"]


def pad_entries(pad, ndim: int, dim: int) -> tuple[tuple[int, int], list[int]]:
    """``((before, after) along dim, the pad spec with dim's entries zeroed)`` of an ``F.pad`` spec."""
    rest = [int(p) for p in pad]
    i = ndim - 1 - dim  # F.pad lists the last dim first
    if 2 * i + 1 >= len(rest):
        return (0, 0), rest
    lo, hi = rest[2 * i], rest[2 * i + 1]
    rest[2 * i] = rest[2 * i + 1] = 0
    return (lo, hi), rest


def pad_plan(domain: Domain, n: int, lo: int, hi: int, mode: str, value, what: str) -> tuple[HaloPlan, int]:
    """``(halo plan, global output length)`` of padding ``n`` rows by ``lo`` before and ``hi`` after."""
    m = n + lo + hi
    in_part, out_part = split_rows(domain, n, m, what)
    needs = tuple((c - lo, e - lo) for c, e in out_part)
    edge = Edge(mode, float(value or 0.0), (max(lo, 0), max(hi, 0)))  # F.pad's mode names are edge modes
    return plan_halo(in_part, needs, domain.rank, edge), m


def roll_shift(shifts, dims, dim: int, ndim: int) -> tuple[int, list[int], list[int]]:
    """``(total shift along dim, the other shifts, their dims)`` of a ``torch.roll`` call."""
    shifts = [int(s) for s in (shifts if isinstance(shifts, (tuple, list)) else [shifts])]
    dims = [int(d) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    total, other_s, other_d = 0, [], []
    for s, d in zip(shifts, dims):
        if d % ndim == dim:
            total += s  # rolls along one dim compose by adding
        else:
            other_s.append(s)
            other_d.append(d)
    return total, other_s, other_d


def roll_plan(domain: Domain, n: int, shift: int, what: str) -> HaloPlan:
    part, _ = split_rows(domain, n, n, what)
    s = shift % n
    return plan_halo(part, tuple((c - s, e - s) for c, e in part), domain.rank, Edge("circular"))


def flip_plan(domain: Domain, n: int, what: str) -> HaloPlan:
    part, _ = split_rows(domain, n, n, what)
    return plan_halo(part, tuple((n - e, n - c) for c, e in part), domain.rank)


@several_axes
def pad(input, pad, mode="constant", value=None, *, axes: tuple[ShardAxis, ...]):
    """``F.pad`` of a slab sharded along each of ``axes``: a sharded dim is padded at the global edges only.

    On several axes one exchange of the block's halo (:mod:`fxhalo.block_halo`): reflect,
    replicate and circular pads are separable, so each corner is the product of the axes'
    images, as on one device."""
    sharded = [(Domain.from_group(g, shard_dim=d), length) for d, g, length in each_axis(axes)]
    rest, edges = [int(p) for p in pad], []
    for domain, length in sharded:
        dim = domain.dim_of(input.ndim)
        (lo, hi), rest = pad_entries(rest, input.ndim, dim)
        edges.append((domain, dim, length, lo, hi))
    # Pad the other dims first, so rows fetched from other ranks arrive padded.
    x = F.pad(input, rest, mode, value) if any(rest) else input
    exchanges = {}
    for a, (domain, dim, length, lo, hi) in enumerate(edges):
        plan, _ = pad_plan(domain, domain.global_length(input.shape[dim], length), lo, hi, mode, value, "F.pad")
        exchanges[a] = (dim, plan, None)
    return exchange_on_axes(x, axes, exchanges)


@several_axes
def roll(input, shifts, dims=(), *, axes: tuple[ShardAxis, ...]):
    """``torch.roll`` of a slab sharded along each of ``axes`` (``dims`` given, as the rule requires)."""
    sharded = [(Domain.from_group(g, shard_dim=d), length) for d, g, length in each_axis(axes)]
    other_s = list(shifts) if isinstance(shifts, (tuple, list)) else [shifts]
    other_d = list(dims) if isinstance(dims, (tuple, list)) else [dims]
    moves = []
    for domain, length in sharded:
        dim = domain.dim_of(input.ndim)
        shift, other_s, other_d = roll_shift(other_s, other_d, dim, input.ndim)
        moves.append((domain, dim, length, shift))
    x = torch.roll(input, other_s, other_d) if other_d else input
    exchanges = {}
    for a, (domain, dim, length, shift) in enumerate(moves):
        exchanges[a] = (
            dim,
            roll_plan(domain, domain.global_length(input.shape[dim], length), shift, "torch.roll"),
            None,
        )
    return exchange_on_axes(x, axes, exchanges)


@several_axes
def flip(input, dims, *, axes: tuple[ShardAxis, ...]):
    """``torch.flip`` of a slab sharded along each of ``axes``; the rule calls it when a flipped dim is sharded."""
    flipped, exchanges = {int(d) % input.ndim for d in dims}, {}
    for a, (shard_dim, group_name, length) in enumerate(each_axis(axes)):
        domain = Domain.from_group(group_name, shard_dim=shard_dim)
        dim = domain.dim_of(input.ndim)
        if dim in flipped:  # fetch the mirror rows
            exchanges[a] = (dim, flip_plan(domain, domain.global_length(input.shape[dim], length), "torch.flip"), None)
    # then flip every requested dim locally (the sharded ones included)
    return exchange_on_axes(input, axes, exchanges).flip(dims)
