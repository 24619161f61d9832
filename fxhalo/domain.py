"""Who shards what: the process group, the sharded tensor dim and the size arithmetic.

A :class:`Domain` is a small frozen value.  Everything that depends on "which rows
does rank r hold" goes through :meth:`Domain.partition`, so that the rule is
written once.  The default rule is *balanced*: for a global length ``N`` on ``P`` ranks
the first ``N % P`` ranks hold one extra row (721 latitudes on 4 ranks: 181, 180,
180, 180).  Plain local slabs follow it: inputs (:func:`shard`), outputs of every op
(each op's output rows are split by the same rule over the op's global output
length), and :func:`gather`.

A :class:`~fxhalo.DomainTensor` may carry any other partition (``torch.chunk``'s,
DTensor's, or arbitrary): its global length is then a :class:`Partitioned`, an
``int`` that also knows every rank's length, and :meth:`Domain.partition` follows
it.  An op whose output has the same global length as its input keeps the input's
partition (:func:`fxhalo.geometry.split_rows`); any other output length is split by
the balanced rule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)

from .errors import FxHaloError

__all__ = [
    "Domain",
    "Partitioned",
    "resolve_group",
    "shard",
    "gather",
    "all_gather_rows",
    "check_partition",
    "several_axes",
    "takes_several_axes",
]


class Partitioned(int):
    """A global length that carries its partition: ``Partitioned((10, 3, 12, 9))`` is 34, split as given.

    An ``int``, so that the size arithmetic of every kernel and rule works on it
    unchanged (arithmetic gives plain ints back); :meth:`Domain.partition` reads
    ``lengths`` instead of applying the balanced rule.
    """

    lengths: tuple[int, ...]

    def __new__(cls, lengths):
        lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in lengths):
            raise FxHaloError(f"a partition cannot hold negative lengths: {lengths}")
        out = super().__new__(cls, sum(lengths))
        out.lengths = lengths
        return out

    def __reduce__(self):
        return (Partitioned, (self.lengths,))

    # Equal only to the same partition, never to a plain int: the kernels' plan caches are keyed
    # by lengths, and a plan for one partition of 34 rows is wrong for another.  Compare
    # ``int(a) == int(b)`` to ask whether two lengths are the same size.
    def __eq__(self, other):
        return isinstance(other, Partitioned) and self.lengths == other.lengths

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(("Partitioned", self.lengths))

    def __repr__(self) -> str:
        return f"Partitioned({self.lengths})"

    __str__ = int.__repr__


def explicit_lengths(length) -> tuple[int, ...] | None:
    """The explicit partition ``length`` carries, or ``None`` (balanced)."""
    return getattr(length, "lengths", None)


def as_length(length):
    """A ``ShardAxis.global_length`` (an int, or a tuple of every rank's length) as a length value."""
    if isinstance(length, (tuple, list)):
        return Partitioned(length)
    return length


def resolve_group(group=None, mesh_axis: str | int | None = None) -> dist.ProcessGroup:
    """Turn the ways a user names a group into a ProcessGroup.

    Accepted: ``None`` (WORLD), a ``ProcessGroup``, a group name, a 1-D
    ``DeviceMesh``, a ``DeviceMesh`` with ``mesh_axis``, or a ``(mesh, axis)`` pair.
    """
    if isinstance(group, tuple) and len(group) == 2 and mesh_axis is None:
        group, mesh_axis = group
    if group is None:
        if not dist.is_initialized():
            raise FxHaloError(
                "fxhalo needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first, or launch with torchrun."
            )
        return dist.group.WORLD
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    if isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if mesh_axis is None:
            if group.ndim != 1:
                raise FxHaloError(
                    f"a {group.ndim}-D DeviceMesh needs the name of its domain axis; "
                    f"pass group=(mesh, axis) with axis one of {group.mesh_dim_names}"
                )
            return group.get_group()
        return group.get_group(mesh_axis)
    raise FxHaloError(f"cannot use {type(group).__name__} as a process group")


class ShardAxis(NamedTuple):
    """One sharded mesh axis as a kernel is told it: the tensor dim the axis splits, the axis's
    process group, and the dim's global length (``None``: the kernel asks the group).

    Every kernel of :mod:`fxhalo.ops` takes ``axes``, a tuple of these, one per sharded
    mesh axis it communicates along.  A named tuple, so that the rewritten graph's code prints it.
    """

    dim: int
    group_name: str
    #: the global length (balanced partition), or every rank's length (a tuple: any partition)
    global_length: int | tuple[int, ...] | None = None


def one_axis(axes) -> ShardAxis:
    """The one sharded axis of ``axes``, for a kernel that communicates along one mesh axis."""
    if len(axes) != 1:
        raise FxHaloError(f"this kernel handles one sharded mesh axis, got {len(axes)}: {tuple(axes)}")
    return each_axis(axes)[0]


def each_axis(axes) -> tuple[ShardAxis, ...]:
    """``axes`` with every length as a length value (a tuple of lengths -> :class:`Partitioned`)."""
    return tuple(ShardAxis(dim, group_name, as_length(length)) for dim, group_name, length in axes)


def several_axes(kernel=None, *, when=None):
    """Mark ``kernel`` as one that communicates along several mesh axes in one call (``axes`` of more
    than one :class:`ShardAxis`); the propagation refuses to hand any other kernel more than one.

    ``when(args, kwargs)``: for a kernel that does so for some settings only, whether these
    (the call's arguments, ``axes`` aside) are such; the others are refused too."""

    def mark(fn):
        fn.fxhalo_several_axes = when or (lambda args, kwargs: True)
        return fn

    return mark if kernel is None else mark(kernel)


def takes_several_axes(kernel, args=(), kwargs=None) -> bool:
    """Can ``kernel(*args, **kwargs)`` communicate along several mesh axes (:func:`several_axes`)?"""
    accepts = getattr(kernel, "fxhalo_several_axes", None)
    return accepts is not None and accepts(tuple(args), dict(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class Domain:
    """The domain-parallel setting of one tensor dim over one process group.

    ``rank`` and ``size`` are this process's position in ``group_name``'s group.
    ``shard_dim`` may be negative (counted from the end of each tensor).
    """

    group_name: str
    rank: int
    size: int
    shard_dim: int = 2

    @classmethod
    def from_group(cls, group=None, *, shard_dim: int = 2, mesh_axis=None) -> Domain:
        pg = resolve_group(group, mesh_axis)
        return cls(pg.group_name, dist.get_rank(pg), dist.get_world_size(pg), shard_dim)

    def kernel_axes(self, dim: int, length: int | None = None) -> tuple[ShardAxis]:
        """The ``axes=`` of a kernel call for a tensor sharded along ``dim`` over this domain.

        A :class:`Partitioned` length goes in as its tuple of lengths (graph code prints it)."""
        lengths = explicit_lengths(length)
        return (ShardAxis(dim, self.group_name, lengths if lengths is not None else length),)

    @property
    def process_group(self) -> dist.ProcessGroup:
        return dist.distributed_c10d._resolve_process_group(self.group_name)

    # -- which dim ---------------------------------------------------------
    def dim_of(self, ndim: int) -> int:
        """The non-negative sharded dim of a tensor with ``ndim`` dims."""
        d = self.shard_dim + ndim if self.shard_dim < 0 else self.shard_dim
        if not 0 <= d < ndim:
            raise FxHaloError(f"shard_dim={self.shard_dim} does not exist on a {ndim}-D tensor")
        return d

    # -- the partition rule -------------------------------------------------
    def partition(self, length: int) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of every rank's rows for a global ``length``: the balanced rule, or the
        partition a :class:`Partitioned` length carries."""
        lengths = explicit_lengths(length)
        if lengths is None:
            return _balanced_partition(int(length), self.size)
        if len(lengths) != self.size:
            raise FxHaloError(f"a partition of {len(lengths)} ranks used on a group of {self.size}: {lengths}")
        return _explicit_partition(lengths)

    def lengths(self, length: int) -> tuple[int, ...]:
        """Every rank's length for a global ``length`` (as :meth:`partition` splits it)."""
        return tuple(b - a for a, b in self.partition(length))

    def length_of(self, lengths) -> int:
        """The global length that splits as ``lengths``: a plain ``int`` when they are the balanced
        split, else a :class:`Partitioned`."""
        lengths = tuple(lengths)
        return sum(lengths) if lengths == balanced_lengths(sum(lengths), self.size) else Partitioned(lengths)

    def bounds(self, length: int, rank: int | None = None) -> tuple[int, int]:
        return self.partition(length)[self.rank if rank is None else rank]

    def rescales(self, n: int, m: int) -> bool:
        """True when scaling every rank's rows of ``n`` by ``m / n`` gives the partition of ``m``.

        Ops that map each row to a fixed block of rows (a reshape that merges or
        splits the sharded dim, a pixel shuffle) are local exactly then; with even
        shards they always are when the sizes divide.
        """
        scaled = []
        for a, b in self.partition(n):
            if a * m % n or b * m % n:
                return False
            scaled.append((a * m // n, b * m // n))
        return tuple(scaled) == self.partition(m)

    def local_length(self, length: int, rank: int | None = None) -> int:
        a, b = self.bounds(length, rank)
        return b - a

    def global_length(self, local_length: int, length: int | None = None) -> int:
        """The global length of a dim of which this rank holds ``local_length`` rows.

        Compiled graphs know it (the backend gathers the inputs' lengths once, at
        compile time, and every kernel call carries its input's ``length``).
        Without it, eager code asks the group: one small all_gather per call, which
        also checks that the shards follow the partition rule.  While tracing, that
        collective cannot run, and assuming even shards could be silently wrong, so
        a kernel traced without ``length`` is refused.
        """
        if length is not None:
            length = as_length(length)
            return length if explicit_lengths(length) is not None else int(length)
        if self.size == 1:
            return int(local_length)
        if torch.compiler.is_compiling():
            raise FxHaloError(
                "an fxhalo kernel was traced without the global length of its input (the fxhalo.nn "
                "modules under torch.compile with another backend, say). Remedy: compile the plain model "
                "with backend='domain_parallel', which passes the lengths, or run fxhalo.nn modules eagerly."
            )
        lengths = _all_lengths(int(local_length), self)
        n = sum(lengths)
        check_partition(lengths, self, "this tensor")
        return n

    # -- neighbours -------------------------------------------------------
    @property
    def left(self) -> int | None:
        return self.rank - 1 if self.rank > 0 else None

    @property
    def right(self) -> int | None:
        return self.rank + 1 if self.rank < self.size - 1 else None

    @property
    def ring_left(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def ring_right(self) -> int:
        return (self.rank + 1) % self.size


def _all_lengths(local: int, domain: Domain) -> list[int]:
    """Every rank's local length (one small all_gather over the domain group)."""
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(domain.size)]
    dist.all_gather(out, torch.tensor([local], dtype=torch.int64), group=domain.process_group)
    return [int(t) for t in out]


def check_partition(lengths, domain: Domain, what: str) -> None:
    """Raise unless the ranks' local ``lengths`` are the partition rule's split of their sum."""
    n = sum(lengths)
    want = [b - a for a, b in domain.partition(n)]
    if list(lengths) != want:
        raise FxHaloError(
            f"{what}: the ranks hold {list(lengths)} rows along the sharded dim, but fxhalo's partition "
            f"rule splits {n} rows over {domain.size} ranks as {want} (the first N % P ranks get one "
            "extra row). Shard with fxhalo.shard(x).to_local(), slice each rank's rows with fxhalo.Domain.bounds(), "
            "or pass DomainTensors (fxhalo.from_local), which take any partition."
        )


@functools.cache
def _explicit_partition(lengths: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return tuple(out)


def balanced_lengths(length: int, size: int) -> tuple[int, ...]:
    """Every rank's length under the balanced rule: the first ``length % size`` ranks hold one extra row."""
    base, extra = divmod(int(length), size)
    return tuple(base + (1 if r < extra else 0) for r in range(size))


@functools.cache
def _balanced_partition(length: int, size: int) -> tuple[tuple[int, int], ...]:
    base, extra = divmod(length, size)
    out, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return tuple(out)


def shard(x: torch.Tensor, shard_dim: int = 2, group=None) -> torch.Tensor:
    """This rank's slab of the global tensor ``x`` (a contiguous copy), by the partition rule: the plain
    path's input.  (:func:`fxhalo.shard` returns the DomainTensor; its ``to_local()`` is this slab.)"""
    dom = Domain.from_group(group, shard_dim=shard_dim)
    d = dom.dim_of(x.ndim)
    start, stop = dom.bounds(x.shape[d])
    return x.narrow(d, start, stop - start).contiguous()


def all_gather_rows(x: torch.Tensor, dim: int, lengths, group_name: str) -> torch.Tensor:
    """All ranks' rows of ``x`` along ``dim``, concatenated in rank order (``lengths[q]`` rows from rank q).

    One functional all_gather: shards shorter than the longest are padded to it
    first, and the padding is cut out after.  Differentiable (its backward is a
    reduce_scatter: the gradient of a value every rank holds is summed).
    """
    size, longest = len(lengths), max(lengths)
    moved = x.movedim(dim, 0)
    if moved.shape[0] < longest:
        moved = torch.cat([moved, moved.new_zeros((longest - moved.shape[0], *moved.shape[1:]))])
    out = torch.ops._c10d_functional.all_gather_into_tensor(moved.contiguous(), size, group_name)
    out = torch.ops._c10d_functional.wait_tensor(out)
    if min(lengths) != longest:
        out = torch.cat([out.narrow(0, q * longest, n) for q, n in enumerate(lengths)])
    return out.movedim(0, dim)


class _GatherAlongDim(torch.autograd.Function):
    """All-gather along ``dim``; the gradient of the (replicated) result is sliced back.

    The gathered tensor is the same on every rank, so its gradient is taken to be
    the same on every rank too: each rank keeps its own rows of it.  This makes ``loss(gather(y)).backward()`` on every
    rank give each rank exactly the single-device gradient of its slab.
    """

    @staticmethod
    def forward(ctx, y, dim, group_name, lengths, rank):
        ctx.dim, ctx.start, ctx.length = dim, sum(lengths[:rank]), lengths[rank]
        return all_gather_rows(y, dim, lengths, group_name).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.length).contiguous(), None, None, None, None


def gather(y: torch.Tensor, shard_dim: int = 2, group=None) -> torch.Tensor:
    """Differentiable all-gather of the slabs ``y`` into the global tensor, on every rank.

    Checks first (one small all-gather) that the ranks' local lengths follow the
    partition rule, and raises :class:`FxHaloError` with the lengths otherwise.
    (:func:`fxhalo.gather` also takes a :class:`~fxhalo.DomainTensor`.)
    """
    dom = Domain.from_group(group, shard_dim=shard_dim)
    d = dom.dim_of(y.ndim)
    if dom.size == 1:
        return y
    lengths = _all_lengths(y.shape[d], dom)
    check_partition(lengths, dom, "fxhalo.gather")
    return _GatherAlongDim.apply(y, d, dom.group_name, tuple(lengths), dom.rank)
