"""Move the shard of a tensor from one tensor dim to another: one ``all_to_all_single``.

A slab sharded along ``src_dim`` (every rank holds a block of rows of it, any
partition) becomes a slab of the same global tensor sharded along ``dst_dim``
(the balanced partition, or the one given).  Rank ``r`` cuts its slab along
``dst_dim`` into the pieces each rank will own and sends piece ``q`` to rank ``q``;
it receives from every rank ``s`` that rank's rows along ``src_dim`` of its own
piece, and joins them along ``src_dim`` in rank order.  Each rank sends
``(P-1)/P`` of its slab (its own piece stays), the least any move of the shard
can send.  The backward is autograd's through the functional collective: the
reverse move.

Complex tensors travel as their real views.  ``seq_to_channels`` /
``channels_to_seq`` are the move for a ``[B, C, L]`` sequence: sequence-sharded
to channel-sharded and back (a long convolution over the whole sequence runs on
the channel shard between them).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .domain import Domain, _all_lengths, balanced_lengths
from .errors import FxHaloError

__all__ = [
    "redistribute",
    "redistribute_slab",
    "redistribute_slabs",
    "seq_to_channels",
    "channels_to_seq",
    "observe_moves",
    "Move",
    "plan_mesh_moves",
    "run_moves",
]


def redistribute_slab(
    x: torch.Tensor,
    src_dim: int,
    dst_dim: int,
    group_name: str,
    src_lengths: tuple[int, ...],
    dst_lengths: tuple[int, ...],
    rank: int,
) -> torch.Tensor:
    """The kernel: ``x`` (rows ``src_lengths[rank]`` of ``src_dim``, all of ``dst_dim``) becomes this
    rank's ``dst_lengths[rank]`` rows of ``dst_dim`` with all of ``src_dim``.  Graph-traceable: every
    size is a Python number."""
    (out,) = redistribute_slabs((x,), src_dim, dst_dim, group_name, src_lengths, dst_lengths, rank)
    return out


def redistribute_slabs(
    xs, src_dim: int, dst_dim: int, group_name: str, src_lengths: tuple, dst_lengths: tuple, rank: int
) -> tuple[torch.Tensor, ...]:
    """:func:`redistribute_slab` of several slabs of one shape and dtype (attention's q, k and v) in one
    ``all_to_all_single``."""
    x = xs[0]
    if x.is_complex():
        real = tuple(torch.view_as_real(t.resolve_conj()) for t in xs)
        src, dst = src_dim % x.ndim, dst_dim % x.ndim
        moved = redistribute_slabs(real, src, dst, group_name, src_lengths, dst_lengths, rank)
        return tuple(torch.view_as_complex(t) for t in moved)
    src_dim, dst_dim = src_dim % x.ndim, dst_dim % x.ndim
    if src_dim == dst_dim:
        raise FxHaloError(f"redistribute: the shard is already along dim {src_dim}")
    if x.shape[dst_dim] != sum(dst_lengths) or x.shape[src_dim] != src_lengths[rank]:
        raise FxHaloError(
            f"redistribute: a slab of shape {tuple(x.shape)} does not hold rows {src_lengths[rank]} of dim "
            f"{src_dim} and all {sum(dst_lengths)} of dim {dst_dim}"
        )
    count = len(xs)
    if _MOVE_OBSERVERS:  # the analytic minimum, from the partitions: all but the piece this rank keeps
        own = src_lengths[rank] * dst_lengths[rank] * (x.numel() // max(x.shape[src_dim] * x.shape[dst_dim], 1))
        for callback in tuple(_MOVE_OBSERVERS):
            callback(count * (x.numel() - own) * x.element_size())
    # Each piece travels with src_dim first and the slabs next to it ([src rows, slab, ...]), so that
    # the pieces a rank receives, in rank order, are already its outputs joined along src_dim: views,
    # not another copy.
    moved = [t.movedim(src_dim, 0) for t in xs]
    d = dst_dim + 1 if dst_dim < src_dim else dst_dim  # dst_dim's place once src_dim leads
    send = _send_buffer(moved, d, dst_lengths)
    other = x.numel() // (x.shape[src_dim] * x.shape[dst_dim])  # elements per (src row, dst row)
    send_sizes = [count * src_lengths[rank] * n * other for n in dst_lengths]
    recv_sizes = [count * n * dst_lengths[rank] * other for n in src_lengths]
    got = torch.ops._c10d_functional.all_to_all_single(send, recv_sizes, send_sizes, group_name)
    got = torch.ops._c10d_functional.wait_tensor(got)
    shape = list(moved[0].shape)
    shape[0], shape[d] = sum(src_lengths), dst_lengths[rank]
    if count == 1:
        return (got.view(shape).movedim(0, src_dim),)
    shape.insert(1, count)
    # unbind, not a select per slab: the backward of unbind is one stack of the gradients into one
    # buffer, where a select's is a zero-filled buffer of the whole received size per slab, summed.
    return tuple(t.movedim(0, src_dim) for t in got.view(shape).unbind(1))


def _send_buffer(moved, d: int, dst_lengths) -> torch.Tensor:
    """The slabs ``moved`` (src dim first) cut along dim ``d`` into the pieces each rank gets, laid out
    piece after piece, each as ``[src rows, slab, ...]``.  Equal pieces take one strided copy (a
    ``stack`` of views); unequal ones a copy per piece and a join."""
    if len(set(dst_lengths)) == 1:  # [P, src rows, slab, ..., n, ...]
        n = dst_lengths[0]
        return torch.stack([t.unflatten(d, (len(dst_lengths), n)).movedim(d, 0) for t in moved], dim=2).reshape(-1)
    pieces = zip(*(t.split(list(dst_lengths), dim=d) for t in moved))
    return torch.cat([torch.stack(piece, dim=1).reshape(-1) for piece in pieces])


_MOVE_OBSERVERS: list = []


@contextlib.contextmanager
def observe_moves(callback):
    """Call ``callback(minimum_bytes)`` for each move of the shard inside the block: the least this
    rank can send, computed from the partitions (its slab less the piece it keeps), for
    :func:`fxhalo.explain` to set against what the collective sends."""
    _MOVE_OBSERVERS.append(callback)
    try:
        yield callback
    finally:
        _MOVE_OBSERVERS.remove(callback)


@torch.library.custom_op("fxhalo::redistribute", mutates_args=())
def _move_shard(x: torch.Tensor, dim: int, lengths: list[int] | None = None) -> torch.Tensor:
    """The global meaning of a move of the shard: the same values (a copy).  It is the graph op a
    compiled region records for ``fxhalo.redistribute(x, dim)`` on a DomainTensor; the backend's rule
    (:mod:`fxhalo.rules.moves`) replaces it by :func:`redistribute_slab` on each rank's slab."""
    return x.clone()


@_move_shard.register_fake
def _(x, dim, lengths=None):
    return x.clone()


_move_shard.register_autograd(lambda ctx, grad: (grad, None, None))


@torch.library.custom_op("fxhalo::redistribute_mesh", mutates_args=())
def _move_shards(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """:func:`_move_shard` on a mesh: each domain axis's shard onto ``dims[axis]`` (balanced); the rule's
    :meth:`~fxhalo.rules.moves.RedistributeOnMesh.decide_on_mesh` plans the moves."""
    return x.clone()


@_move_shards.register_fake
def _(x, dims):
    return x.clone()


_move_shards.register_autograd(lambda ctx, grad: (grad, None))


class Move(NamedTuple):
    """One move of one mesh axis's shard: from ``dim`` (every rank's rows ``src_lengths``) to ``dst``
    (split as ``dst_lengths``), over the group of the kernel's ``axes[axis]``.  (A named tuple: FX prints
    it in the graph's code.)"""

    dim: int
    dst: int
    src_lengths: tuple[int, ...]
    dst_lengths: tuple[int, ...]
    axis: int = 0


def plan_mesh_moves(shape, split, dims) -> tuple[Move, ...]:
    """The moves that take a value of global ``shape`` split as ``split`` (per mesh axis that splits it:
    ``(dim, every rank's lengths)``) to ``dims`` (one target dim per such axis, balanced).

    An axis moves only when its target dim is split by no other axis at that moment; when every
    waiting axis waits for another (a swap of H and W), one of them first parks on a dim no axis
    splits nor targets (the longest with a row per rank).  Raises :class:`FxHaloError` when no order
    and no free dim does it.
    """
    where = [tuple(a) for a in split]
    if len(dims) != len(where) or len(set(dims)) != len(dims):
        raise FxHaloError(
            f"redistribute on a mesh takes one target dim per mesh axis that splits the tensor ({len(where)}), "
            f"each a different dim; got {tuple(dims)}"
        )
    moves: list[Move] = []

    def move(axis: int, dst: int) -> None:
        dim, lengths = where[axis]
        new = tuple(balanced_lengths(shape[dst], len(lengths)))
        moves.append(Move(dim, dst, tuple(lengths), new, axis))
        where[axis] = (dst, new)

    while True:
        waiting = [a for a, (d, _) in enumerate(where) if d != dims[a]]
        if not waiting:
            return tuple(moves)
        taken = {d for d, _ in where}
        ready = [a for a in waiting if dims[a] not in taken]
        if ready:
            move(ready[0], dims[ready[0]])
            continue
        axis = waiting[0]
        size = len(where[axis][1])
        free = [d for d in range(len(shape)) if d not in taken and d not in dims and shape[d] >= size]
        if not free:
            raise FxHaloError(
                f"redistribute: the mesh axes' shards cannot move from dims {[d for d, _ in where]} to {list(dims)}: "
                "each waits for a dim another splits, and no other dim has a row per rank to pass through. "
                "Remedy: move them in two calls through a dim of your choice"
            )
        move(axis, max(free, key=lambda d: (shape[d], -d)))


def run_moves(x: torch.Tensor, moves, groups: tuple[str, ...]) -> torch.Tensor:
    """Run ``moves`` (:class:`Move`s, or steps with the same fields) on this rank's block; ``groups``: the
    process group of each axis the moves name."""
    for m in moves:
        rank = Domain.from_group(groups[m.axis]).rank
        x = redistribute_slab(x, m.dim, m.dst, groups[m.axis], tuple(m.src_lengths), tuple(m.dst_lengths), rank)
    return x


def _redistribute_on_mesh(x, dims, dst_lengths):
    """:func:`redistribute` of a DomainTensor split over several mesh axes (``dims``: one per split axis)."""
    from .tensor import DomainSpec, MeshSpec, wrap_local

    if not isinstance(dims, (tuple, list)) or dst_lengths is not None:
        raise FxHaloError(
            "redistribute of a tensor split over mesh axes takes one target dim per axis, balanced (no "
            "dst_lengths), e.g. fxhalo.redistribute(x, (1, 3))"
        )
    dims = tuple(int(d) % x.ndim for d in dims)
    if torch.compiler.is_compiling():
        return _move_shards(x, list(dims))
    if not isinstance(x.spec, MeshSpec):
        raise FxHaloError(f"redistribute: a tuple of dims is for tensors split over mesh axes; this one is {x.spec}")
    specs = x.spec.axis_specs
    moves = plan_mesh_moves(tuple(x.shape), tuple((a.dim, tuple(a.lengths)) for a in specs), dims)
    block = run_moves(x.to_local(), moves, tuple(a.group_name for a in specs))
    moved = {specs[m.axis].group_name: DomainSpec(specs[m.axis].group_name, m.dst, m.dst_lengths) for m in moves}
    axes = tuple(None if a is None else moved.get(a.group_name, a) for a in x.spec.axes)
    return wrap_local(block, MeshSpec(x.spec.group_name, axes))


def redistribute(x: torch.Tensor, src_dim: int, dst_dim: int | None = None, group=None, dst_lengths=None):
    """Move the shard of a tensor to another dim, with one ``all_to_all_single``.

    * ``fxhalo.redistribute(x, dim, dst_lengths=None)`` on a :class:`~fxhalo.DomainTensor`:
      the same global tensor, sharded along ``dim`` (the balanced partition, or
      ``dst_lengths``).  Inside a ``domain_parallel`` compiled region it is a graph op the
      backend partitions; outside, it moves the slabs at once.
    * ``fxhalo.redistribute(x, (d1, d2))`` on a DomainTensor split over two mesh axes: each axis's
      shard onto its dim (balanced), one ``all_to_all_single`` per axis that moves, over that
      axis's ranks (:func:`plan_mesh_moves`; a swap passes through a free dim).
    * ``fxhalo.redistribute(x, dim)`` on a plain tensor returns it: the same model code runs on
      one device (and in a compiled region on DomainTensors the tensor is a DomainTensor).
    * ``fxhalo.redistribute(x, src_dim, dst_dim, group, dst_lengths=None)`` on this rank's
      plain slab along ``src_dim`` (any partition: one small all-gather of the local
      lengths learns it): this rank's slab along ``dst_dim``.

    Differentiable: the backward is the reverse move.
    """
    from .construct import from_local
    from .tensor import DomainTensor, MeshSpec

    # A tuple of dims is the mesh spelling (read from the arguments: Dynamo cannot trace the spec's type)
    if isinstance(x, DomainTensor) and isinstance(src_dim, (tuple, list)):
        return _redistribute_on_mesh(x, src_dim, dst_lengths if dst_dim is None else dst_dim)
    if isinstance(x, DomainTensor) and not torch.compiler.is_compiling() and isinstance(x.spec, MeshSpec):
        return _redistribute_on_mesh(x, src_dim, dst_lengths)  # refused: one dim per axis
    if isinstance(x, DomainTensor):
        dim, lengths = src_dim % x.ndim, dst_lengths if dst_dim is None else dst_dim
        lengths = None if lengths is None else [int(n) for n in lengths]
        if torch.compiler.is_compiling():
            return _move_shard(x, dim, lengths)
        spec = x.spec
        domain = Domain.from_group(spec.group_name, shard_dim=spec.dim)
        dst = tuple(lengths) if lengths is not None else tuple(domain.lengths(x.shape[dim]))
        if dim == spec.dim and dst == tuple(spec.lengths):
            return x
        if dim == spec.dim:
            raise FxHaloError("redistribute: the shard is already along that dim (re-split it with fxhalo.shard)")
        slab = redistribute_slab(x.to_local(), spec.dim, dim, spec.group_name, tuple(spec.lengths), dst, domain.rank)
        return from_local(slab, dim, spec.group_name, lengths=dst, run_check=False)
    if dst_dim is None:  # a whole tensor (a model run on one device): the move changes nothing
        return x
    domain = Domain.from_group(group, shard_dim=src_dim)
    if domain.size == 1:
        return x
    src = tuple(_all_lengths(int(x.shape[src_dim]), domain))
    n = int(x.shape[dst_dim])
    if dst_lengths is None:
        dst_lengths = list(domain.lengths(n))
    dst = tuple(int(d) for d in dst_lengths)
    if sum(dst) != n or len(dst) != domain.size:
        raise FxHaloError(f"redistribute: dst_lengths {dst} do not split {n} rows over {domain.size} ranks")
    return redistribute_slab(x, src_dim, dst_dim, domain.group_name, src, dst, domain.rank)


def seq_to_channels(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[B, C, L_local]`` (sequence-sharded) -> ``[B, C_local, L]`` (channel-sharded, balanced)."""
    return redistribute(x, -1, -2, group)


def channels_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[B, C_local, L]`` (channel-sharded) -> ``[B, C, L_local]`` (sequence-sharded, balanced)."""
    return redistribute(x, -2, -1, group)
