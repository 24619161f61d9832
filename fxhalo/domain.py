"""Who shards what: the process group, the sharded tensor dim and the size arithmetic.

A :class:`Domain` is a small frozen value.  Everything that depends on "which rows
does rank r hold" goes through :meth:`Domain.partition`, so that the rule is
written once.  The rule is *balanced*: for a global length ``N`` on ``P`` ranks
the first ``N % P`` ranks hold one extra row.  For now every tensor that fxhalo
shards must split evenly (``N % P == 0``); :meth:`Domain.require_even` enforces
that with a message naming the sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)

from .errors import FxHaloError

__all__ = ["Domain", "resolve_group", "shard", "gather"]


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
    def from_group(cls, group=None, *, shard_dim: int = 2, mesh_axis=None) -> "Domain":
        pg = resolve_group(group, mesh_axis)
        return cls(pg.group_name, dist.get_rank(pg), dist.get_world_size(pg), shard_dim)

    @property
    def process_group(self) -> dist.ProcessGroup:
        return dist.distributed_c10d._resolve_process_group(self.group_name)

    # -- which dim ---------------------------------------------------------
    def dim_of(self, ndim: int) -> int:
        """The non-negative sharded dim of a tensor with ``ndim`` dims."""
        d = self.shard_dim + ndim if self.shard_dim < 0 else self.shard_dim
        if not 0 <= d < ndim:
            raise FxHaloError(
                f"shard_dim={self.shard_dim} does not exist on a {ndim}-D tensor"
            )
        return d

    # -- the partition rule -------------------------------------------------
    def partition(self, length: int) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of every rank's rows for a global ``length`` (balanced rule)."""
        return _balanced_partition(int(length), self.size)

    def bounds(self, length: int, rank: int | None = None) -> tuple[int, int]:
        return self.partition(length)[self.rank if rank is None else rank]

    def require_even(self, length: int, what: str) -> None:
        if length % self.size:
            raise FxHaloError(
                f"{what}: global length {length} along the sharded dim does not split evenly "
                f"over {self.size} ranks ({length} % {self.size} = {length % self.size}). "
                "Uneven shards are not supported yet; choose sizes divisible by the rank count."
            )

    def global_length(self, local_length: int) -> int:
        """Global length for equal local lengths on every rank."""
        return int(local_length) * self.size

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


@functools.lru_cache(maxsize=None)
def _balanced_partition(length: int, size: int) -> tuple[tuple[int, int], ...]:
    base, extra = divmod(length, size)
    out, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return tuple(out)


def shard(x: torch.Tensor, shard_dim: int = 2, group=None) -> torch.Tensor:
    """This rank's slab of the global tensor ``x`` (a contiguous copy).

    Raises :class:`FxHaloError` if ``x.shape[shard_dim]`` does not split evenly.
    """
    dom = Domain.from_group(group, shard_dim=shard_dim)
    d = dom.dim_of(x.ndim)
    dom.require_even(x.shape[d], "fxhalo.shard")
    start, stop = dom.bounds(x.shape[d])
    return x.narrow(d, start, stop - start).contiguous()


class _GatherAlongDim(torch.autograd.Function):
    """All-gather along ``dim``; the gradient of the (replicated) result is sliced back.

    The gathered tensor is the same on every rank, so its gradient is taken to be
    the same on every rank too (DTensor's convention for Replicate): each rank
    keeps its own rows of it.  This makes ``loss(gather(y)).backward()`` on every
    rank give each rank exactly the single-device gradient of its slab.
    """

    @staticmethod
    def forward(ctx, y, dim, group_name, size, rank):
        ctx.dim, ctx.rank, ctx.length = dim, rank, y.shape[dim]
        moved = y.movedim(dim, 0).contiguous()
        out = torch.ops._c10d_functional.all_gather_into_tensor(moved, size, group_name)
        out = torch.ops._c10d_functional.wait_tensor(out)
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.length
        return grad.narrow(ctx.dim, start, ctx.length).contiguous(), None, None, None, None


def gather(y: torch.Tensor, shard_dim: int = 2, group=None) -> torch.Tensor:
    """Differentiable all-gather of the slabs ``y`` into the global tensor, on every rank.

    Checks first (one small all-gather) that every rank holds the same local
    length, and raises :class:`FxHaloError` with the lengths otherwise.
    """
    dom = Domain.from_group(group, shard_dim=shard_dim)
    d = dom.dim_of(y.ndim)
    if dom.size == 1:
        return y
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(dom.size)]
    dist.all_gather(lengths, torch.tensor([y.shape[d]], dtype=torch.int64), group=dom.process_group)
    lengths = [int(t) for t in lengths]
    if len(set(lengths)) != 1:
        raise FxHaloError(
            f"fxhalo.gather: local lengths along dim {d} differ between ranks: {lengths}. "
            "Every rank must hold the same number of rows."
        )
    return _GatherAlongDim.apply(y, d, dom.group_name, dom.size, dom.rank)
