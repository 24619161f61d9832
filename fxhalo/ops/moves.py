"""Layout moves the global view inserts: replicated -> sharded (a slice) and sharded -> replicated (a gather).

* :func:`own_rows` keeps this rank's rows of a replicated tensor (a positional grid
  built from ``x.shape``, a latitude weight, a tensor computed replicated because its
  sharded dim was too short).  No communication.  Its backward pads the gradient
  with zeros: inside a graph a replicated value's gradient is partial (see
  :mod:`fxhalo.ops.collectives`), and the ranks' slices add up to the whole.
* :func:`all_rows` gathers a sharded tensor whole on every rank (one all-gather), for
  a layer too short to shard.  Its backward is a reduce-scatter.
* :func:`repartition` moves rows between ranks so that a sharded tensor takes another
  partition of the same global length (a resampled tensor meeting a skip connection
  split another way).
* :func:`move_shard` moves the shard to another tensor dim (``fxhalo.redistribute`` in a
  compiled region): one all_to_all_single.
* :func:`slice_rows` and :func:`set_rows` read and write a slice of the sharded dim in
  global rows: each rank touches the selected rows it holds (no communication).
* :func:`regroup` gives a sharded tensor another set of rows per rank along the same
  dim (an interleaved shard, each rank holding a slice of every window, back to one
  block per rank): one all_to_all_single of the rows that change rank.
* :func:`sum_partial` and :func:`scatter_partial` turn a partial sum
  (:class:`fxhalo.layout.Partial`) into its total: replicated (an all-reduce), or
  sharded (a reduce-scatter, for the rows each rank goes on with).
"""

from __future__ import annotations

import math

import torch

from ..domain import Domain, Partitioned, ShardAxis, all_gather_rows, one_axis, several_axes
from ..halo import halo_exchange
from .collectives import all_reduce_sum
from .rows import halo_plan

__all__ = [
    "own_rows",
    "all_rows",
    "repartition",
    "slice_rows",
    "set_rows",
    "move_shard",
    "sum_partial",
    "scatter_partial",
    "regroup",
    "regroup_plan",
]


def _domain(axes: tuple[ShardAxis, ...]):
    dim, group_name, length = one_axis(axes)
    domain = Domain.from_group(group_name, shard_dim=dim)
    return dim, group_name, domain, domain.global_length(0, length)


def own_rows(input: torch.Tensor, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """This rank's rows of the replicated ``input`` along ``axes``' dim, by ``axes``' partition."""
    dim, _, domain, length = _domain(axes)
    dim = domain.dim_of(input.ndim)
    start, stop = domain.bounds(length)
    return input.narrow(dim, start, stop - start)


def all_rows(input: torch.Tensor, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """The whole of the sharded ``input`` along ``axes``' dim, on every rank (one all-gather)."""
    dim, group_name, domain, length = _domain(axes)
    lengths = domain.lengths(length)
    return all_gather_rows(input, domain.dim_of(input.ndim), lengths, group_name)


def repartition(input: torch.Tensor, lengths: tuple[int, ...], *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """The rows of the sharded ``input`` re-split as ``lengths`` (same global length, another partition).

    Each rank's new rows are a halo plan over the old partition (rows it already
    holds stay; the others come from the ranks that hold them): one all_to_all_single,
    carrying only the rows that change rank.
    """
    dim, group_name, domain, length = _domain(axes)
    target = Domain.partition(domain, Partitioned(lengths))
    plan = halo_plan(domain.partition(length), target, domain.rank)
    return halo_exchange(input, domain.dim_of(input.ndim), plan, group_name)


def move_shard(input: torch.Tensor, dim: int, lengths: tuple[int, ...], *, axes: tuple[ShardAxis, ...]):
    """The sharded ``input`` sharded along ``dim`` instead, split as ``lengths``: one all_to_all_single
    (:func:`fxhalo.redistribute.redistribute_slab`)."""
    from ..redistribute import redistribute_slab

    _, group_name, domain, length = _domain(axes)
    src = domain.dim_of(input.ndim)
    return redistribute_slab(input, src, dim, group_name, tuple(domain.lengths(length)), tuple(lengths), domain.rank)


@several_axes
def move_shards(input: torch.Tensor, moves: tuple, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """``fxhalo.redistribute`` on a mesh: the planned moves (:func:`fxhalo.redistribute.plan_mesh_moves`),
    each over its axis's group (``axes``: every axis that splits the input, in the plan's order)."""
    from ..redistribute import run_moves

    return run_moves(input, moves, tuple(a.group_name for a in axes))


def sum_partial(input: torch.Tensor, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """The total of the partial sums ``input`` over ``axes``' group, on every rank (one all-reduce)."""
    return all_reduce_sum(input, one_axis(axes).group_name)


def scatter_partial(input: torch.Tensor, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """This rank's rows, along ``axes``' dim and by its partition, of the total of the partial sums
    ``input``: a reduce-scatter, built as a move of the shard.

    Stacked along a new leading dim, the ranks' summands are one tensor sharded along
    that dim, one row per rank; moving that shard onto the rows' dim
    (:func:`fxhalo.redistribute.redistribute_slab`, one ``all_to_all_single``) gives each
    rank every summand of its own rows, which it adds up.  Each rank sends ``(P-1)/P``
    of its summand, what a reduce-scatter sends, for any partition (uneven ones
    included, which ``reduce_scatter_tensor`` cannot split).  The backward is the
    reverse move: an all-gather of the rows' gradients, the whole gradient a partial
    sum's summands each get.
    """
    from ..redistribute import redistribute_slab

    dim, group_name, domain, length = _domain(axes)
    dim = domain.dim_of(input.ndim)
    stacked = input.unsqueeze(0)
    ones = (1,) * domain.size
    return redistribute_slab(stacked, 0, dim + 1, group_name, ones, tuple(domain.lengths(length)), domain.rank).sum(0)


def expand_index(index, ndim: int) -> tuple:
    """``x[index]``'s items, one per input dim or ``None`` (a new dim), with ``...`` spelled out."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        fill = ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + (slice(None),) * fill + items[at + 1 :]
    return items


def rows_of_slice(sl: slice, partition) -> tuple[tuple[int, slice], ...]:
    """For each rank's rows ``[a, b)`` of a dim split as ``partition``: how many rows of ``x[sl]`` it holds,
    and the slice of its own rows that gives them (``sl`` over the global dim, positive step)."""
    n = partition[-1][1]
    start, stop, step = sl.indices(n)
    out = []
    for a, b in partition:
        end = min(b, stop)
        first = max(0, -((start - a) // step)) if a > start else 0  # ceil((a - start) / step)
        last = -((start - end) // step) if end > start else 0  # rows start + k*step < end
        count = max(0, last - first)
        lo = start + first * step - a
        out.append((count, slice(lo, lo + (count - 1) * step + 1, step) if count else slice(0, 0)))
    return tuple(out)


def _local_index(t: torch.Tensor, index, axes) -> tuple:
    """``index``, whose items for the sharded dims (one per mesh axis of ``axes``) slice global rows, with
    each such item made this rank's slice of its own rows."""
    items = list(expand_index(index, t.ndim))
    for axis in axes:
        _, _, domain, length = _domain((axis,))
        at = _item_of_dim(items, domain.dim_of(t.ndim))
        items[at] = rows_of_slice(items[at], domain.partition(length))[domain.rank][1]
    return tuple(items)


@several_axes
def slice_rows(input: torch.Tensor, index, *, axes: tuple[ShardAxis, ...]) -> torch.Tensor:
    """``input[index]`` where ``index`` slices the sharded dim in global rows: each rank keeps the selected
    rows it holds (no communication; the output's partition is the count on every rank).

    A rank that holds none of the rows gets a fresh empty tensor, not an empty view: autograd
    saves a view's whole base for the backward of ops that read it (an FNO's einsum on the
    modes another rank holds would keep that rank's whole spectrum alive until backward)."""
    out = input[_local_index(input, index, axes)]
    return out.clone() if out.numel() == 0 else out


@several_axes
def set_rows(target: torch.Tensor, index, value, *, axes: tuple[ShardAxis, ...]) -> None:
    """``target[index] = value`` where ``index`` slices the sharded dim of ``target`` in global rows and
    ``value`` holds, on every rank, the selected rows that rank's ``target`` holds (in place; no
    communication)."""
    target[_local_index(target, index, axes)] = value


# A setitem replaced by set_rows has no users; FX must not drop it as dead code.
torch.fx.node.has_side_effect(set_rows)


def _item_of_dim(items, dim: int) -> int:
    """Which item of an expanded index applies to input dim ``dim``."""
    seen = 0
    for i, item in enumerate(items):
        if item is None:
            continue
        if seen == dim:
            return i
        seen += 1
    raise IndexError(f"the index has no item for dim {dim}")


def regroup_plan(src_rows, dst_rows, rank: int):
    """For :func:`regroup`: from every rank's global rows before (``src_rows[r]``, in local order) and
    after (``dst_rows[r]``), what this rank sends (per destination, its local row indices, in the
    destination's order), how many rows it receives from each rank, and the order that puts the rows
    received (by source rank) into its own new order."""
    where = {row: i for i, row in enumerate(src_rows[rank])}
    send = tuple(tuple(where[row] for row in dst if row in where) for dst in dst_rows)
    mine = set(dst_rows[rank])
    received = [row for src in src_rows for row in sorted((r for r in src if r in mine), key=dst_rows[rank].index)]
    counts = tuple(sum(1 for r in src if r in mine) for src in src_rows)
    at = {row: i for i, row in enumerate(received)}
    return send, counts, tuple(at[row] for row in dst_rows[rank])


def regroup(input: torch.Tensor, send: tuple, counts: tuple, order: tuple, *, axes: tuple[ShardAxis, ...]):
    """The rows of ``input`` along ``axes``' dim regrouped between ranks (:func:`regroup_plan`'s
    ``send``, ``counts``, ``order``): one ``all_to_all_single``; the rows a rank keeps travel no wire."""
    dim, group_name, _ = one_axis(axes)
    x = input.movedim(dim, 0)
    flat = [i for rows in send for i in rows]
    pieces = x.index_select(0, torch.tensor(flat, dtype=torch.long, device=x.device))
    row = math.prod(x.shape[1:])
    got = torch.ops._c10d_functional.all_to_all_single(
        pieces.reshape(-1), [c * row for c in counts], [len(rows) * row for rows in send], group_name
    )
    got = torch.ops._c10d_functional.wait_tensor(got).view(sum(counts), *x.shape[1:])
    out = got.index_select(0, torch.tensor(order, dtype=torch.long, device=x.device))
    return out.movedim(0, dim)
