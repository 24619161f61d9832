"""Making DomainTensors: :func:`from_local`, :func:`shard` and :func:`from_dtensor`, along one sharded dim or
over the domain axes of a mesh.

On a mesh (``group=mesh``, ``shard_dim=(2, 3)``: one dim per domain axis, in mesh-axis
order) the rank at mesh coordinate ``(i, j)`` holds block ``(i, j)``, any partition
along each axis (each axis's lengths are asked from that axis's ranks, as in 1-D).  The
spec is then a :class:`~fxhalo.tensor.MeshSpec`: one :class:`~fxhalo.tensor.DomainSpec`
per domain axis and the whole domain's group (:mod:`fxhalo.mesh`).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from .domain import balanced_lengths, resolve_group
from .errors import FxHaloError
from .mesh import MeshDomain, mesh_domain, mesh_of
from .tensor import DomainSpec, DomainTensor, MeshSpec, wrap_local

__all__ = ["from_local", "shard", "from_dtensor"]


def from_local(
    x_local: torch.Tensor,
    shard_dim: int = 2,
    group=None,
    lengths=None,
    *,
    like: DomainTensor | None = None,
    run_check: bool = True,
) -> DomainTensor:
    """Wrap this rank's slab ``x_local`` of a global tensor sharded along ``shard_dim`` over ``group``.

    ``lengths`` lists every rank's length along ``shard_dim`` (any partition);
    ``None`` asks the group.  ``like=`` takes another DomainTensor's group, dim and
    partition.  With ``run_check`` (the default; always when ``lengths`` is
    ``None``) one small all-gather over the default group checks that every rank agrees
    on the group, the dim, the other dims and the lengths, and every rank raises
    :class:`FxHaloError` together otherwise (so every rank of the job calls it together).
    Differentiable: the gradient of the DomainTensor flows to ``x_local``.

    On a mesh of several domain axes (``group=mesh``, ``shard_dim=(2, 3)``: one dim per
    axis, in mesh-axis order), the rank at mesh coordinate ``(i, j)`` holds block
    ``(i, j)``; ``lengths`` is then one partition per axis (below).
    """
    if _on_mesh(shard_dim, like):
        return from_local_on_mesh(x_local, shard_dim, group, lengths, like, run_check)
    if like is not None:
        group, shard_dim, lengths = like._spec.group_name, like._spec.dim, like._spec.lengths
    pg = resolve_group(group)
    dim = shard_dim + x_local.ndim if shard_dim < 0 else shard_dim
    if not 0 <= dim < x_local.ndim:
        raise FxHaloError(f"shard_dim={shard_dim} does not exist on a {x_local.ndim}-D tensor")
    size, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if lengths is not None:
        lengths = tuple(int(n) for n in lengths)
    if run_check or lengths is None:
        lengths = _agreed_lengths(x_local, dim, lengths, pg, size)
    elif len(lengths) != size or lengths[rank] != x_local.shape[dim]:
        raise FxHaloError(
            f"fxhalo.from_local: lengths {list(lengths)} do not fit this rank ({rank} of {size}), "
            f"which holds {x_local.shape[dim]} rows along dim {dim}"
        )
    return wrap_local(x_local, DomainSpec(pg.group_name, dim, lengths))


def _on_mesh(shard_dim, like) -> bool:
    """Several sharded dims (a mesh of domain axes), or ``like`` a DomainTensor split so."""
    if like is not None:
        return not isinstance(like._spec, DomainSpec)
    return isinstance(shard_dim, (tuple, list)) and len(shard_dim) > 1


def _agreed_lengths(x_local, dim, lengths, pg, size) -> tuple[int, ...]:
    """Every rank's length along ``dim``, after checking (one all-gather) that the ranks agree.

    The all-gather runs over the default group, which every rank joins, not over ``pg``:
    ranks that passed different groups would otherwise each wait in a collective of their
    own.  Each rank then checks the members of its group: the same group, dim, other dims
    and lengths.  (So every rank of the job calls ``from_local`` together, as in SPMD
    training; ``run_check=False`` with ``lengths`` skips the check.)
    """
    members = dist.get_process_group_ranks(pg)
    others = [n for d, n in enumerate(x_local.shape) if d != dim]
    mine = [
        _digest(members, pg.group_name),
        dim,
        x_local.ndim,
        x_local.shape[dim],
        math.prod(others),
        _digest(others),
        -1 if lengths is None else _digest(lengths),
    ]
    got = [torch.zeros(len(mine), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(got, torch.tensor(mine, dtype=torch.int64))
    rows = [got[r].tolist() for r in members]
    found = tuple(r[3] for r in rows)
    problems = []
    strangers = [q for q, r in zip(members, rows) if r[0] != mine[0]]
    if strangers:
        problems.append(f"ranks {strangers} of this rank's group passed another process group")
    elif len({(r[1], r[2]) for r in rows}) != 1:
        problems.append(f"the ranks shard different dims or ranks of tensor: (dim, ndim) = {[r[1:3] for r in rows]}")
    elif len({(r[4], r[5]) for r in rows}) != 1:
        problems.append("the ranks' slabs differ in a dim that is not sharded")
    elif lengths is not None and (len({r[6] for r in rows}) != 1 or lengths != found):
        problems.append(f"the lengths given, {list(lengths)}, are not the lengths the ranks hold, {list(found)}")
    if problems:
        raise FxHaloError("fxhalo.from_local: " + "; ".join(problems) + ". Every rank raises this.")
    return found


def _digest(*values) -> int:
    """A hash that is the same in every process (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(values).encode())


def shard(
    x: torch.Tensor, shard_dim: int = 2, group=None, lengths=None, *, like: DomainTensor | None = None
) -> DomainTensor:
    """The DomainTensor of a global tensor ``x`` every rank holds: each rank keeps its rows.

    ``lengths`` picks the partition (default balanced: the first ``N % P`` ranks hold one
    extra row); ``like=`` takes another DomainTensor's group, dim and partition, to slice a
    target as the model's output is split.  No communication; differentiable (each rank's
    slab's gradient flows to its rows of ``x``).  ``fxhalo.shard(x).to_local()`` is the plain
    slab the plain path and the eager modules take (:func:`fxhalo.domain.shard`).  On a mesh:
    ``shard_dim=(2, 3), group=mesh``, each rank keeps its block (:func:`from_local`).
    """
    if _on_mesh(shard_dim, like):
        return shard_on_mesh(x, shard_dim, group, lengths, like)
    if like is not None:
        group, shard_dim, lengths = like._spec.group_name, like._spec.dim, like._spec.lengths
    pg = resolve_group(group)
    size, rank = dist.get_world_size(pg), dist.get_rank(pg)
    dim = shard_dim + x.ndim if shard_dim < 0 else shard_dim
    if not 0 <= dim < x.ndim:
        raise FxHaloError(f"shard_dim={shard_dim} does not exist on a {x.ndim}-D tensor")
    spec = DomainSpec(pg.group_name, dim, _shard_lengths(x.shape[dim], size, lengths))
    start, stop = spec.bounds(rank)
    return wrap_local(x.narrow(dim, start, stop - start).contiguous(), spec)


def from_dtensor(dt) -> DomainTensor:
    """A DomainTensor of a DTensor sharded along one tensor dim of a 1-D mesh (``Shard(d)``), no copy.

    DTensor splits like ``torch.chunk``: the lengths are asked from the group.
    """
    from torch.distributed.tensor import Shard

    placements = dt.placements
    if not placements or not all(isinstance(p, Shard) for p in placements):
        raise FxHaloError(
            f"fxhalo.from_dtensor takes a DTensor sharded along one dim per mesh axis (Shard(d) only), got "
            f"placements {placements}"
        )
    if len(placements) > 1:
        return from_local(dt.to_local(), tuple(p.dim for p in placements), dt.device_mesh)
    return from_local(dt.to_local(), placements[0].dim, dt.device_mesh.get_group())


# -- on a mesh of several domain axes ---------------------------------------------------


def _dims(shard_dim, ndim: int) -> tuple[int, ...]:
    dims = tuple(d + ndim if d < 0 else d for d in shard_dim)
    for given, d in zip(shard_dim, dims):
        if not 0 <= d < ndim:
            raise FxHaloError(f"shard_dim={given} does not exist on a {ndim}-D tensor")
    return dims


def _mesh(group, shard_dim, lengths, like, ndim) -> tuple[MeshDomain, list, list]:
    """The mesh domain, and per domain axis the dim (``None``: not split along it) and the lengths
    (``None``: balanced, or asked from the ranks) of a call."""
    if like is not None:
        spec = like._spec
        dims = [None if a is None else a.dim for a in spec.axes]
        return mesh_of(spec.group_name), dims, [None if a is None else a.lengths for a in spec.axes]
    dims = list(_dims(tuple(shard_dim), ndim))
    if lengths is None:
        lengths = [None] * len(dims)
    if len(lengths) != len(dims):
        raise FxHaloError(f"lengths {list(lengths)} give {len(lengths)} partitions for the {len(dims)} dims {dims}")
    return mesh_domain(group, dims), dims, [None if ls is None else tuple(int(n) for n in ls) for ls in lengths]


def from_local_on_mesh(x_local: torch.Tensor, shard_dim, group, lengths, like, run_check: bool) -> DomainTensor:
    """:func:`fxhalo.from_local` with one dim per domain axis of a mesh (see the module docstring)."""
    mesh, dims, lengths = _mesh(group, shard_dim, lengths, like, x_local.ndim)
    axes = []
    for axis, d, ls in zip(mesh.axes, dims, lengths):
        if d is None:
            axes.append(None)
        elif run_check or ls is None:
            ls = _agreed_lengths(x_local, d, ls, axis.process_group, axis.size)  # every rank checks every axis
        elif len(ls) != axis.size or ls[axis.rank] != x_local.shape[d]:
            raise FxHaloError(
                f"fxhalo.from_local: lengths {list(ls)} do not fit this rank (coordinate {axis.rank} of {axis.size} "
                f"along its mesh axis), which holds {x_local.shape[d]} rows along dim {d}"
            )
        if d is not None:
            axes.append(DomainSpec(axis.group_name, d, ls))
    return wrap_local(x_local, MeshSpec(mesh.whole.group_name, tuple(axes)))


def _shard_lengths(n: int, size: int, lengths) -> tuple[int, ...]:
    """Every rank's length of ``n`` rows over ``size`` ranks for :func:`shard`: ``lengths`` checked, or the
    balanced rule's."""
    lengths = balanced_lengths(n, size) if lengths is None else tuple(int(v) for v in lengths)
    if len(lengths) != size or sum(lengths) != n or min(lengths) < 0:
        raise FxHaloError(f"fxhalo.shard: lengths {list(lengths)} do not split {n} rows over {size} ranks")
    return lengths


def shard_on_mesh(x: torch.Tensor, shard_dim, group, lengths, like) -> DomainTensor:
    """:func:`fxhalo.shard` with one dim per domain axis of a mesh: each rank keeps its block of ``x``."""
    mesh, dims, lengths = _mesh(group, shard_dim, lengths, like, x.ndim)
    axes = []
    for axis, d, ls in zip(mesh.axes, dims, lengths):
        if d is None:
            axes.append(None)
            continue
        spec = DomainSpec(axis.group_name, d, _shard_lengths(x.shape[d], axis.size, ls))
        start, stop = spec.bounds(axis.rank)
        x = x.narrow(d, start, stop - start)
        axes.append(spec)
    return wrap_local(x.contiguous(), MeshSpec(mesh.whole.group_name, tuple(axes)))
