"""A domain of several mesh axes: 2-D (and 3-D) domain decomposition over a ``DeviceMesh``.

``options={"group": mesh, "shard_dim": (2, 3)}`` shards tensor dim 2 over the mesh's
first axis and dim 3 over its second: the rank at mesh coordinate ``(i, j)`` holds
block ``(i, j)``, rows by the partition rule over the first axis's ranks, columns over
the second's.  ``group=(mesh, ("h", "w"))`` names the domain axes of a mesh that has
others too (a data axis for DDP).

Each domain axis is a one-axis :class:`~fxhalo.domain.Domain` (that axis's process
group, this rank's coordinate along it, the tensor dim it splits), so that everything
fxhalo knows about one sharded dim applies along each axis.  The *whole* domain, every
rank of the domain axes, is one more group: the one a reduction over all the sharded
dims sums over in one collective, the one ``grad_sync`` sums the weight gradients over,
and the one the ranks agree over before any collective runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch.distributed as dist

from .domain import Domain, ShardAxis
from .errors import FxHaloError

__all__ = [
    "MeshDomain",
    "mesh_domain",
    "mesh_of",
    "whole_group",
    "whole_coords",
    "is_mesh",
    "on_several_axes",
    "simulated_rank",
]


@dataclasses.dataclass(frozen=True)
class MeshDomain:
    """The domain axes (one :class:`Domain` per mesh axis, in mesh-axis order) and the whole domain."""

    axes: tuple[Domain, ...]
    whole: Domain
    #: the domain axes' names on the mesh (or their indices, as text), for reports
    names: tuple[str, ...] = ()

    @property
    def shard_dims(self) -> tuple[int, ...]:
        return tuple(a.shard_dim for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def labels(self) -> dict[str, str]:
        """Group name -> what a report calls it: the axis's name, and ``"whole"`` for the whole domain."""
        names = self.names or tuple(f"dim {d}" for d in self.shard_dims)
        out = {a.group_name: name for a, name in zip(self.axes, names)}
        if len(self.axes) > 1:
            out[self.whole.group_name] = "whole"
        return out


#: (every axis's group name, in mesh-axis order) -> the whole domain's group name, on this rank
_WHOLE: dict[tuple[str, ...], str] = {}
#: the whole domain's group name -> the mesh coordinates of each of its ranks, in its rank order
_COORDS: dict[str, tuple[tuple[int, ...], ...]] = {}


def mesh_domain(group, shard_dims, mesh_axes=None) -> MeshDomain:
    """The :class:`MeshDomain` of ``shard_dims`` (one tensor dim per domain axis) over a ``DeviceMesh``.

    ``group`` is the mesh, or ``(mesh, axes)``; ``mesh_axes`` names the domain axes
    (default: every axis of the mesh).  Raises :class:`FxHaloError` (on every rank
    alike: it depends only on the arguments) for a group that is not a mesh, an axis
    the mesh does not have or named twice, a dim named twice, or a number of dims that
    differs from the number of axes.  Creates the whole domain's group on first use
    (every rank must call it, as for any new group).
    """
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, tuple) and len(group) == 2 and mesh_axes is None:
        group, mesh_axes = group
    shard_dims = tuple(shard_dims)
    if not isinstance(group, DeviceMesh):
        raise FxHaloError(
            f"shard_dim={shard_dims} shards {len(shard_dims)} dims, which needs a DeviceMesh with one axis per "
            f"dim as the group, not {type(group).__name__}. Remedy: options={{'group': init_device_mesh('cpu', "
            "(2, 2), mesh_dim_names=('h', 'w')), 'shard_dim': (2, 3)}"
        )
    names = tuple(group.mesh_dim_names or ())
    if mesh_axes is None:
        mesh_axes = names if names else tuple(range(group.ndim))
    elif isinstance(mesh_axes, (str, int)):
        mesh_axes = (mesh_axes,)
    mesh_axes = tuple(mesh_axes)
    for axis in mesh_axes:
        if axis not in names and not (isinstance(axis, int) and 0 <= axis < group.ndim):
            raise FxHaloError(f"mesh axis {axis!r} is not an axis of the group's DeviceMesh (its axes: {names})")
    if len(set(mesh_axes)) != len(mesh_axes):
        raise FxHaloError(f"the mesh axes {mesh_axes} name one axis twice; each domain axis shards one dim")
    if len(shard_dims) != len(mesh_axes):
        raise FxHaloError(
            f"shard_dim={shard_dims} has {len(shard_dims)} dims for {len(mesh_axes)} domain mesh axes "
            f"{mesh_axes}: give one tensor dim per domain axis, in mesh-axis order"
        )
    if len(set(shard_dims)) != len(shard_dims):
        raise FxHaloError(f"shard_dim={shard_dims} names one dim twice; each mesh axis must shard a dim of its own")
    if len(mesh_axes) > 1 and not names:
        raise FxHaloError(
            "a DeviceMesh without mesh_dim_names cannot be flattened into the whole domain's group. Remedy: "
            "init_device_mesh(..., mesh_dim_names=('h', 'w'))"
        )
    axes = tuple(Domain.from_group(group, shard_dim=d, mesh_axis=a) for a, d in zip(mesh_axes, shard_dims))
    if len(axes) == 1:
        whole = axes[0]
    else:
        # DeviceMesh keeps a flattened mesh per name, so compiling again reuses the group.
        sub = group[tuple(names[a] if isinstance(a, int) else a for a in mesh_axes)]
        pg = sub._flatten().get_group()
        whole = Domain.from_group(pg, shard_dim=shard_dims[0])
        at = {int(g): c for c, g in zip(itertools.product(*map(range, sub.mesh.shape)), sub.mesh.flatten().tolist())}
        _COORDS[whole.group_name] = tuple(at[g] for g in dist.get_process_group_ranks(pg))
    _WHOLE[tuple(a.group_name for a in axes)] = whole.group_name
    labels = tuple(str(names[a]) if isinstance(a, int) and names else str(a) for a in mesh_axes)
    domain = MeshDomain(axes, whole, labels)
    if len(axes) > 1:
        _MESHES[whole.group_name] = domain
    return domain


#: the whole domain's group name -> its MeshDomain (the last one built on this rank), for DomainTensors,
#: which carry group names (fxhalo.tensor.MeshSpec)
_MESHES: dict[str, MeshDomain] = {}


def mesh_of(whole_group_name: str) -> MeshDomain:
    """The :class:`MeshDomain` whose whole domain is ``whole_group_name`` (built by :func:`mesh_domain`)."""
    if whole_group_name not in _MESHES:
        raise FxHaloError(
            f"no mesh domain with the whole group {whole_group_name!r} was set up on this rank; make the "
            "DomainTensors with fxhalo.from_local(..., group=mesh) or fxhalo.shard(..., group=mesh)"
        )
    return _MESHES[whole_group_name]


def whole_group(axes: tuple[ShardAxis, ...]) -> str:
    """The group over every rank of ``axes``' mesh axes (a kernel that reduces over all of them sums there)."""
    if len(axes) == 1:
        return axes[0][1]
    key = tuple(a[1] for a in axes)
    if key not in _WHOLE:
        raise FxHaloError(
            f"no domain of the mesh axes with groups {key} was set up on this rank; build it with "
            "fxhalo.mesh.mesh_domain (the domain_parallel backend does) before calling the kernel"
        )
    return _WHOLE[key]


def whole_coords(axes: tuple[ShardAxis, ...]) -> tuple[tuple[int, ...], ...]:
    """The mesh coordinates (along ``axes``, in order) of each rank of their whole group, in its rank order."""
    return _COORDS[whole_group(axes)]


def simulated_rank(world_size, shard_dims, rank, tool: str) -> int:
    """For a tool that simulates a mesh without a process group: check that ``world_size`` is the mesh's
    shape (one size per sharded dim) and ``rank`` (default 0) a flat rank of it; returns the rank."""
    if not (
        isinstance(world_size, tuple)
        and len(world_size) == len(shard_dims)
        and all(isinstance(n, int) and n >= 1 for n in world_size)
    ):
        raise FxHaloError(
            f"{tool} with shard_dim={shard_dims} and no process group needs the mesh's shape as world_size, one "
            f"size per sharded dim (e.g. world_size={tuple(2 for _ in shard_dims)}), not {world_size!r}"
        )
    rank = 0 if rank is None else rank
    if not 0 <= rank < math.prod(world_size):
        raise FxHaloError(f"{tool}: rank {rank} is not a rank of a {world_size} mesh")
    return rank


def is_mesh(group) -> bool:
    """A ``DeviceMesh``, or a ``(mesh, axes)`` pair."""
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(group[0] if isinstance(group, tuple) and len(group) == 2 else group, DeviceMesh)


def on_several_axes(shard_dim, group) -> bool:
    """Do ``shard_dim`` and ``group`` make a domain of mesh axes (several dims, or a tuple on a mesh),
    the case the backend, explain and validate take through :func:`mesh_domain`?"""
    return isinstance(shard_dim, tuple) and (len(shard_dim) > 1 or is_mesh(group))
