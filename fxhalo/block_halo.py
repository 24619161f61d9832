"""The halo of a block on a mesh of several axes, corners included, in one collective.

On a ``p x q`` mesh every rank holds a block, and an op that reaches across both sharded
dims (a 3x3 conv) needs rows from its H neighbours, columns from its W neighbours and the
corner values from its diagonal neighbours.  Each axis's exchange is planned as in 1-D
(:func:`fxhalo.halo.plan_halo`: the global rows each rank needs along that dim, from
whom, and what lies past the global edges); the block's needs are the *product* of the
axes' plans:

* along each axis a rank's needed range is a list of runs: rows owned by one rank of the
  axis (its own, a neighbour's, or further for wide halos and wrap-arounds), or fill;
* a cell of the product (one run per axis) is fill when any of its runs is (their one
  value: fills that differ are refused, since which padding lies outside the other is not
  in the plans), else it belongs to the rank at the runs' owners' coordinates: this rank
  (taken from its own block), or another (received);
* each rank sends every other rank the cells of that rank's product it owns, in the
  product's row-major order, and receives its own the same way: **one**
  ``all_to_all_single`` over the whole domain, every value sent once, fill never.

The extended block is the cells joined along each dim.  Every rank can work out every
rank's product (the plans depend only on the partitions and the needed ranges), so all
agree on whether the collective happens at all.  Measured against one exchange per axis
in ``benchmarks/corner_exchange.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch

from .domain import Domain, each_axis
from .errors import FxHaloError
from .halo import HaloPlan, _notify, _runs_for, assemble_fetched, fetched_rows, halo_exchange, plan_halo
from .mesh import whole_coords, whole_group

__all__ = ["BlockPlan", "plan_block", "block_exchange", "block_parts", "exchange_on_axes", "own_rows"]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of a rank's product: ``kind`` "local", "recv" or "fill"; per axis ``(start, length,
    reverse)`` rows of the owner's block (``start`` ascending; ``reverse``: flip after taking them)."""

    kind: str
    rows: tuple[tuple[int, int, bool], ...]
    value: float = 0.0
    owner: int = -1  # the whole-group rank of a "recv" cell's owner


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """This rank's side of the exchange: its cells (the axes' runs, row-major), what it sends to each
    rank of the whole group (cells of that rank's product, row-major) and receives from each."""

    shape: tuple[int, ...]  # the cell grid: runs per axis
    lengths: tuple[int, ...]  # rows of the extended block along each axis
    cells: tuple[Cell, ...]
    send: tuple[tuple[tuple[int, int, bool], ...], ...]  # rows of each cell sent, in buffer order
    send_cells: tuple[int, ...]  # cells sent to each rank of the whole group
    recv_cells: tuple[int, ...]
    collective: bool


def _cells(runs_per_axis, rank_of) -> list[Cell]:
    cells = []
    for combo in itertools.product(*runs_per_axis):
        fills = [r for r in combo if r[0] == "fill"]
        lengths = [r[2] if r[0] == "fill" else r[3] for r in combo]
        if fills:
            if len({f[1] for f in fills}) > 1:
                # Which would win depends on which padding lies outside the other (a pad folded into a conv
                # puts its constant inside the conv's zeros); no op on a mesh makes such corners today.
                raise FxHaloError(
                    f"a corner of the halo lies past the global edges of several sharded dims with different "
                    f"fill values ({sorted({f[1] for f in fills})}); fxhalo does not exchange such a block in "
                    "one step. Remedy: pad each dim with the same value, or shard one of these dims only"
                )
            rows = tuple((0, n, False) for n in lengths)
            cells.append(Cell("fill", rows, value=fills[0][1]))
            continue
        rows = tuple((min(r[2], r[2] + (r[3] - 1) * r[4]), r[3], r[4] == -1 and r[3] > 1) for r in combo)
        cells.append(Cell("row", rows, owner=rank_of(tuple(r[1] for r in combo))))
    return cells


@functools.lru_cache(maxsize=1024)
def plan_block(plans: tuple[HaloPlan, ...], whole_ranks: tuple[tuple[int, ...], ...]) -> BlockPlan:
    """The exchange of this rank's block, given each axis's 1-D plan (``plan.rank``: this rank's
    coordinate along that axis) and ``whole_ranks``: the coordinates of each rank of the whole group,
    in its rank order.  Pure and cached."""
    rank_of = {coords: r for r, coords in enumerate(whole_ranks)}.__getitem__
    me = rank_of(tuple(p.rank for p in plans))
    runs = [[_runs_for(s, e, p.partition, p.edge) for s, e in p.needs] for p in plans]  # [axis][coordinate]

    products = [_cells([runs[a][c] for a, c in enumerate(coords)], rank_of) for coords in whole_ranks]
    mine = products[me]
    send, send_cells, recv_cells, collective = [], [], [0] * len(whole_ranks), False
    for dest, theirs in enumerate(products):
        remote = [c for c in theirs if c.kind == "row" and c.owner != dest]
        collective = collective or bool(remote)
        out = [c.rows for c in remote if c.owner == me] if dest != me else []
        send.extend(out)
        send_cells.append(len(out))
    cells = []
    for c in mine:
        if c.kind == "row" and c.owner != me:
            recv_cells[c.owner] += 1
            cells.append(dataclasses.replace(c, kind="recv"))
        else:
            cells.append(dataclasses.replace(c, kind="local") if c.kind == "row" else c)
    shape = tuple(len(runs[a][p.rank]) for a, p in enumerate(plans))
    lengths = tuple(e - s for s, e in (p.needs[p.rank] for p in plans))
    return BlockPlan(shape, lengths, tuple(cells), tuple(send), tuple(send_cells), tuple(recv_cells), collective)


def _take(x: torch.Tensor, dims, rows) -> torch.Tensor:
    for dim, (start, length, _) in zip(dims, rows):
        x = x.narrow(dim, start, length)
    return x


def _cell_shape(x: torch.Tensor, dims, rows) -> list[int]:
    shape = list(x.shape)
    for dim, (_, length, _) in zip(dims, rows):
        shape[dim] = length
    return shape


def _recv_numels(x: torch.Tensor, dims, plan: BlockPlan) -> list[int]:
    """How many values this rank receives from each rank of the whole group."""
    inner = x.numel() // math.prod(x.shape[d] for d in dims) if x.numel() else 0
    sizes = [0] * len(plan.recv_cells)
    for c in plan.cells:
        if c.kind == "recv":
            sizes[c.owner] += inner * math.prod(n for _, n, _ in c.rows)
    return sizes


def block_parts(x: torch.Tensor, exchanges, whole_ranks):
    """:func:`block_exchange`'s collective taken apart, as :func:`fxhalo.halo.exchange_parts` does for
    one dim: ``(sends, recv_numels, received, plan)``; ``received(chunks)`` gives the received values
    as :func:`block_exchange` takes them (``received=``), ``plan`` is the :class:`BlockPlan`."""
    dims = tuple(d for d, _, _ in exchanges)
    for _, plan, edge in exchanges:
        if plan.collective:  # as the 1-D exchange tells its observers (an axis taking its own rows: never)
            _notify(plan, edge)
    plan = plan_block(tuple(p for _, p, _ in exchanges), tuple(whole_ranks))
    cells = [_take(x, dims, rows).reshape(-1) for rows in plan.send]
    sends, at = [], 0
    for n in plan.send_cells:
        mine = cells[at : at + n]
        sends.append(torch.cat(mine) if len(mine) > 1 else mine[0] if mine else x.reshape(-1).narrow(0, 0, 0))
        at += n
    recv_sizes = _recv_numels(x, dims, plan)

    def received(chunks):
        return _packed(x, dims, plan, chunks)

    return sends, recv_sizes, received, plan


def _packed(x: torch.Tensor, dims, plan: BlockPlan, chunks) -> torch.Tensor:
    """The received cells (``chunks[q]``: what came from rank ``q``, flat) as one tensor shaped like ``x``
    except along the sharded ``dims``: each cell's values along them flattened onto the first, the others
    of length 1, the cells one after another in the plan's order.  Every other dim keeps its place, so
    values that broadcast over the block (a norm's statistics per sample and channel) broadcast over it
    too.  The sharded dims must be adjacent (:func:`packable`); :func:`_unpacked` undoes it."""
    at = [0] * len(chunks)
    cells = []
    for c in plan.cells:
        if c.kind != "recv":
            continue
        shape = _cell_shape(x, dims, c.rows)
        n = math.prod(shape)
        cell = chunks[c.owner].narrow(0, at[c.owner], n).view(shape)
        at[c.owner] += n
        cells.append(cell.reshape(_packed_shape(shape, dims)))
    if not cells:
        empty = list(x.shape)
        for d in dims:
            empty[d] = 0 if d == dims[0] else 1
        # Still reading every chunk (empty), so that the collective stays on this rank's autograd graph.
        return torch.cat([t.reshape(-1) for t in chunks]).view(empty) if chunks else x.new_zeros(empty)
    return torch.cat(cells, dims[0]) if len(cells) > 1 else cells[0]


def _packed_shape(shape, dims) -> list[int]:
    out = list(shape)
    out[dims[0]] = math.prod(shape[d] for d in dims)
    for d in dims[1:]:
        out[d] = 1
    return out


def packable(dims) -> bool:
    """Can a block sharded along ``dims`` carry its received cells packed (:func:`block_parts`): are the
    sharded dims adjacent?"""
    dims = sorted(dims)
    return dims == list(range(dims[0], dims[0] + len(dims)))


def _unpacked(x: torch.Tensor, dims, plan: BlockPlan, packed: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{cell index: its values}`` of the received cells in ``packed`` (:func:`_packed`)."""
    out, at = {}, 0
    for i, c in enumerate(plan.cells):
        if c.kind != "recv":
            continue
        shape = _cell_shape(x, dims, c.rows)
        n = math.prod(shape[d] for d in dims)
        out[i] = packed.narrow(dims[0], at, n).reshape(shape)
        at += n
    return out


def block_exchange(x: torch.Tensor, exchanges, group_name: str, whole_ranks, *, received=None) -> torch.Tensor:
    """This rank's block of ``x`` extended along several dims at once: ``exchanges`` is one
    ``(dim, HaloPlan, edge)`` per axis (``edge`` only tells the halo observers), ``group_name`` the
    whole domain's group and ``whole_ranks`` its ranks' coordinates (:func:`plan_block`).
    ``received``: the values a fused producer fetched already (:func:`block_parts`); then nothing is
    communicated.  Differentiable: autograd sends each halo value's gradient back to its owner."""
    if x.is_complex():  # collectives take real tensors: exchange the real view (a trailing dim of 2)
        exchanges = tuple((d % x.ndim, plan, edge) for d, plan, edge in exchanges)
        real = block_exchange(torch.view_as_real(x.resolve_conj()), exchanges, group_name, whole_ranks)
        return torch.view_as_complex(real)
    dims = tuple(d for d, _, _ in exchanges)
    fetched, recv, starts = {}, None, {}
    if received is not None:
        plan = plan_block(tuple(p for _, p, _ in exchanges), tuple(whole_ranks))
        fetched = _unpacked(x, dims, plan, received)
    else:
        sends, recv_sizes, _, plan = block_parts(x, exchanges, whole_ranks)
        if plan.collective:
            # A rank that sends nothing still sends a view of its block (empty): then the collective is on
            # its autograd graph, and it joins the backward all_to_all the others run.
            buffer = torch.cat(sends) if len(sends) > 1 else sends[0]
            send_sizes = [t.numel() for t in sends]
            recv = torch.ops._c10d_functional.all_to_all_single(buffer, recv_sizes, send_sizes, group_name)
            recv = torch.ops._c10d_functional.wait_tensor(recv)
            starts = {q: sum(recv_sizes[:q]) for q in range(len(recv_sizes))}
    parts = []
    for i, c in enumerate(plan.cells):
        if c.kind == "fill":
            parts.append(x.new_full(_cell_shape(x, dims, c.rows), c.value))
            continue
        if c.kind == "local":
            t = _take(x, dims, c.rows)
        elif i in fetched:
            t = fetched[i]
        else:
            shape = _cell_shape(x, dims, c.rows)
            t = recv.narrow(0, starts[c.owner], math.prod(shape)).view(shape)
            starts[c.owner] += math.prod(shape)
        flips = [d for d, (_, _, reverse) in zip(dims, c.rows) if reverse]
        parts.append(t.flip(flips) if flips else t)
    if parts:
        out = _join(parts, plan.shape, dims)
    else:  # this rank needs no rows along some dim: an empty block of the extents it needs
        shape = list(x.shape)
        for d, length in zip(dims, plan.lengths):
            shape[d] = length
        out = x.new_zeros(shape)
    if received is not None and not fetched:  # the fused producer's (empty) values: stay on the graph
        recv = received
    if recv is not None and recv.numel() == 0:
        # The (empty) received buffer feeds the result on every rank, so that every rank's autograd
        # graph reaches the collective and joins its backward (a rank missing it would hang the others).
        shape = list(out.shape)
        shape[dims[0]] = 0
        out = torch.cat([out, recv.view(shape)], dims[0])
    return out


def _join(parts: list[torch.Tensor], shape: tuple[int, ...], dims) -> torch.Tensor:
    """The cells (row-major over ``shape``) joined along each dim, the last axis first."""
    if len(shape) == 1:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dims[0])
    step = math.prod(shape[1:])
    bands = [_join(parts[i * step : (i + 1) * step], shape[1:], dims[1:]) for i in range(shape[0])]
    return bands[0] if len(bands) == 1 else torch.cat(bands, dims[0])


def own_rows(x: torch.Tensor, domain: Domain) -> tuple:
    """The ``(dim, HaloPlan, edge)`` entry of :func:`block_exchange` for an axis whose rows the block takes
    as they are: every rank of that axis's line holds, and needs, its own rows."""
    dim = domain.dim_of(x.ndim)
    own = ((0, x.shape[dim]),) * domain.size
    return dim, plan_halo(own, own, domain.rank), None


def exchange_on_axes(x: torch.Tensor, axes, exchanges: dict) -> torch.Tensor:
    """The halo an op needs on several mesh axes: ``exchanges`` maps the index (in ``axes``) of each axis
    whose halo it needs to ``(dim, HaloPlan, edge)``.  One such axis: that axis's 1-D exchange
    (:func:`fxhalo.halo.halo_exchange`); several: :func:`block_exchange` over the whole domain, the
    other axes taking their own rows."""
    axes = each_axis(axes)
    if not exchanges:
        return x
    # A fused producer may have fetched the rows already (fxhalo.halo.takes_received_rows).
    fetched = fetched_rows(tuple(exchanges[a][1] if a in exchanges else None for a in range(len(axes))))
    if len(exchanges) == 1:
        ((a, (dim, plan, edge)),) = exchanges.items()
        if fetched is not None:
            return assemble_fetched(x, fetched, dim, plan)
        return halo_exchange(x, dim, plan, axes[a].group_name, edge=edge)
    per_axis = []
    for a, axis in enumerate(axes):
        if a in exchanges:
            per_axis.append(exchanges[a])
            continue
        per_axis.append(own_rows(x, Domain.from_group(axis.group_name, shard_dim=axis.dim)))
    return block_exchange(x, per_axis, whole_group(axes), whole_coords(axes), received=fetched)
