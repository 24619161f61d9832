"""``DomainTensor``: the global tensor, as every rank sees it, holding only this rank's slab.

A DomainTensor's shape, dtype and device are the *global* tensor's; inside it
holds this rank's slab (``to_local()``) and its :class:`DomainSpec`: the process
group, the sharded tensor dim, and the partition (every rank's length along that
dim).  Any partition is allowed: the balanced one :func:`fxhalo.shard` uses by default,
``torch.chunk``'s, DTensor's, or one of your own.

Its purpose is the global view (:mod:`fxhalo.passes.localize`): Dynamo traces a
model called on DomainTensors at global shapes, so ``x.shape[2]`` in user code is
the global size, and the ``domain_parallel`` backend partitions that program per
rank.  Outside a ``domain_parallel`` compiled region a DomainTensor computes
nothing but a few operations that are exact on the slabs themselves (those the
autograd engine needs, such as adding two gradients laid out alike); every other
op raises :class:`~fxhalo.FxHaloError` rather than compute on the slab as if it
were the whole tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from . import domain as _domain
from .domain import Partitioned, all_gather_rows, balanced_lengths, resolve_group
from .errors import FxHaloError
from .mesh import mesh_of

__all__ = ["DomainSpec", "MeshSpec", "DomainTensor", "gather", "gather_domain_tensor", "input_mesh", "wrap_local"]


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """How a DomainTensor is split: along tensor dim ``dim`` over ``group_name``'s ranks, rank ``q``
    holding ``lengths[q]`` rows (one mesh axis)."""

    group_name: str
    dim: int
    lengths: tuple[int, ...]

    @property
    def global_length(self) -> int:
        return sum(self.lengths)

    @property
    def balanced(self) -> bool:
        """True when the lengths are the balanced rule's (:class:`~fxhalo.Domain`)."""
        return self.lengths == balanced_lengths(self.global_length, len(self.lengths))

    def length(self):
        """The global length as the layouts carry it: an ``int`` when balanced, else a ``Partitioned``."""
        return self.global_length if self.balanced else Partitioned(self.lengths)

    def bounds(self, rank: int) -> tuple[int, int]:
        start = sum(self.lengths[:rank])
        return start, start + self.lengths[rank]

    @property
    def axis_specs(self) -> tuple[DomainSpec, ...]:
        """One spec per sharded mesh axis: this one (:class:`fxhalo.tensor.MeshSpec` has several)."""
        return (self,)

    @property
    def shard_dim(self) -> int:
        return self.dim

    @property
    def partition(self) -> tuple[int, ...]:
        return self.lengths

    def __str__(self) -> str:
        return f"Shard(dim={self.dim}, partition={list(self.lengths)}, group={self.group_name!r})"


def global_shape_of(local_shape, spec) -> tuple[int, ...]:
    """The global shape of a slab of ``local_shape`` laid out as ``spec`` (one axis or several)."""
    shape = list(local_shape)
    for a in spec.axis_specs:
        shape[a.dim] = a.global_length
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """How a DomainTensor is split over the domain axes of a mesh whose whole domain is ``group_name``:
    per axis (mesh-axis order), a :class:`~fxhalo.tensor.DomainSpec` or ``None`` (whole along it)."""

    group_name: str
    axes: tuple[DomainSpec | None, ...]

    @property
    def axis_specs(self) -> tuple[DomainSpec, ...]:
        return tuple(a for a in self.axes if a is not None)

    @property
    def shard_dim(self) -> tuple[int, ...]:
        return tuple(a.dim for a in self.axis_specs)

    @property
    def partition(self) -> tuple[tuple[int, ...], ...]:
        return tuple(a.lengths for a in self.axis_specs)

    def __str__(self) -> str:
        parts = ", ".join("R" if a is None else f"dim {a.dim}: {list(a.lengths)}" for a in self.axes)
        return f"Shard(mesh axes: {parts}; group={self.group_name!r})"


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


#: ops a DomainTensor runs outside a compiled region: exact on the slabs when every DomainTensor
#: operand is laid out alike (what autograd needs to accumulate and seed gradients, plus copies)
_EAGER_OK = {
    "aten::detach",
    "aten::alias",
    "aten::clone",
    "aten::_to_copy",
    "aten::zeros_like",
    "aten::ones_like",
    "aten::empty_like",
    "aten::full_like",
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::mul",
    "aten::div",
    "aten::neg",
    "aten::copy_",
    "aten::zero_",
    "aten::fill_",
}


#: ops that give the same tensor again: while tracing, the result keeps the input's slab and spec
_SAME_SLAB = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


class DomainTensor(torch.Tensor):
    """The global tensor of shape ``shape``; this rank holds ``to_local()``, laid out as ``spec``.

    Make one with :func:`fxhalo.from_local`, :func:`fxhalo.shard` or
    :func:`fxhalo.from_dtensor`; a ``domain_parallel`` compiled model returns them.
    """

    _local: torch.Tensor
    _spec: DomainSpec

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls, local: torch.Tensor, spec: DomainSpec, shape=None, requires_grad: bool = False, device=None, strides=None
    ):
        shape = global_shape_of(local.shape, spec) if shape is None else tuple(shape)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            # while tracing, the global value's own strides (a transpose is a view: decompositions read them)
            strides=_contiguous_strides(shape) if strides is None else tuple(strides),
            dtype=local.dtype,
            device=local.device if device is None else device,  # explain: a meta slab of a CPU tensor
            requires_grad=requires_grad,
        )

    def __init__(
        self, local: torch.Tensor, spec: DomainSpec, shape=None, requires_grad: bool = False, device=None, strides=None
    ):
        self._local = local
        self._spec = spec

    # -- what Dynamo needs to trace it (a traceable wrapper subclass) ---------
    def __tensor_flatten__(self):
        return ["_local"], (self._spec, self.device)

    @staticmethod
    def __tensor_unflatten__(inner, context, outer_size, outer_stride):
        spec, device = context
        return DomainTensor(inner["_local"], spec, tuple(outer_size), device=device, strides=outer_stride)

    # -- the user's view -----------------------------------------------------
    @property
    def spec(self) -> DomainSpec:
        return self._spec

    @property
    def partition(self):
        """Every rank's length along the sharded dim (on a mesh: a tuple of them per sharded axis)."""
        return self._spec.partition

    @property
    def shard_dim(self):
        """The sharded dim (on a mesh: one per sharded axis, in mesh-axis order)."""
        return self._spec.shard_dim

    def to_local(self) -> torch.Tensor:
        """This rank's slab (differentiable: its gradient flows back to this DomainTensor)."""
        return _ToLocal.apply(self)

    def full_tensor(self) -> torch.Tensor:
        """The whole tensor on every rank (one all-gather; differentiable)."""
        return gather_domain_tensor(self)

    def __repr__(self) -> str:
        return (
            f"DomainTensor(shape={tuple(self.shape)}, {self._spec}, local={tuple(self._local.shape)}, "
            f"dtype={self.dtype})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = pytree.tree_leaves((args, kwargs))
        mine = [a for a in flat if isinstance(a, DomainTensor)]
        if any(isinstance(a._local, FakeTensor) or a._local.is_meta for a in mine):
            return _trace(func, args, kwargs, mine)  # metadata only (meta slabs: fxhalo.explain)
        return _eager(func, args, kwargs, mine)


def _trace(func, args, kwargs, mine):
    """While Dynamo traces: run ``func`` on fake tensors of the *global* shapes.

    The results are DomainTensors whose inner value is a global-shaped fake: only
    their metadata matter, and the backend decides every value's layout itself.
    """
    fakes = [a._local.fake_mode for a in mine if isinstance(a._local, FakeTensor)]
    # Without a fake mode the slabs are meta tensors (fxhalo.explain): compute on the meta device.
    mode = fakes[0] if fakes else contextlib.nullcontext()
    device = mine[0].device
    if func in _SAME_SLAB and isinstance(args[0], DomainTensor):  # keep the slab (Dynamo fakes inputs so)
        x = args[0]
        out = func(x._local, *args[1:], **kwargs)
        return DomainTensor(out, x._spec, tuple(x.shape), device=x.device, strides=x.stride())

    def to_global(a):
        if not isinstance(a, torch.Tensor):
            return a
        if not fakes:
            if isinstance(a, DomainTensor):
                return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
            return a.to("meta")
        if not isinstance(a, DomainTensor):
            return a
        if tuple(a._local.shape) == tuple(a.shape) and a._local.device == a.device:
            return a._local
        with mode:
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)

    with mode:
        out = func(*pytree.tree_map(to_global, args), **pytree.tree_map(to_global, kwargs))
    spec = mine[0]._spec

    def wrap(o):
        if not isinstance(o, torch.Tensor):
            return o
        if o.is_conj() or o.is_neg():  # the wrapper carries no lazy bits: ops on it would see them unresolved
            o = o.resolve_conj().resolve_neg()
        return DomainTensor(o, spec, tuple(o.shape), device=device, strides=o.stride())

    return pytree.tree_map(wrap, out)


def _eager(func, args, kwargs, mine):
    name = func._schema.name
    specs = {a._spec for a in mine}
    shapes = {tuple(a.shape) for a in mine}
    if name in _EAGER_OK and len(specs) == 1 and len(shapes) == 1:
        plain = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if all(isinstance(a, DomainTensor) or a.dim() == 0 for a in plain):
            spec = specs.pop()

            def unwrap(a):
                return a._local if isinstance(a, DomainTensor) else a

            out = func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))
            if name.endswith("_"):  # in place: the DomainTensor argument itself
                return args[0]
            return pytree.tree_map(
                lambda o: DomainTensor(o, spec) if isinstance(o, torch.Tensor) else o,
                out,
            )
    raise FxHaloError(
        f"{func} was called on a DomainTensor outside a domain_parallel compiled region "
        f"(shape {tuple(mine[0].shape)}, {mine[0]._spec}); fxhalo does not compute on a slab as if "
        "it were the whole tensor. Remedy: run this code inside torch.compile(..., "
        "backend='domain_parallel'), or work on x.to_local() (this rank's slab) or "
        "x.full_tensor() (the gathered tensor) explicitly."
    )


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, spec):
        return DomainTensor(local.view_as(local), spec)

    @staticmethod
    def backward(ctx, grad):
        return (grad._local if isinstance(grad, DomainTensor) else grad), None


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.spec = x._spec
        return x._local.view_as(x._local)

    @staticmethod
    def backward(ctx, grad):
        return DomainTensor(grad.contiguous(), ctx.spec)


def wrap_local(local: torch.Tensor, spec: DomainSpec) -> DomainTensor:
    """A DomainTensor around ``local`` (no checks, no communication; differentiable)."""
    return _static(_FromLocal.apply(local, spec))


def _static(x: DomainTensor) -> DomainTensor:
    """Mark every size of ``x`` and its slab static for Dynamo.

    A function called on DomainTensors of several sizes (a UNet block's code at each
    level, across a graph break) recompiles; Dynamo's automatic dynamic shapes would
    then make the sizes symbolic, naming them in the order each rank met them, and
    fxhalo plans with numbers.  Static sizes recompile per size instead, the same on
    every rank.
    """
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static(x)
    return x


def gather(y: torch.Tensor, shard_dim: int = 2, group=None) -> torch.Tensor:
    """The whole tensor, on every rank (differentiable): of a DomainTensor (which carries its dim,
    group and partition), or of plain slabs sharded along ``shard_dim`` by the balanced rule
    (:func:`fxhalo.domain.gather`)."""
    if isinstance(y, DomainTensor):
        return gather_domain_tensor(y)
    return _domain.gather(y, shard_dim, group)


def gather_domain_tensor(x: DomainTensor) -> torch.Tensor:
    """The whole tensor of ``x`` on every rank (one all-gather; each rank's gradient goes to its slab)."""
    spec = x._spec
    return _Gather.apply(x, spec)


class _Gather(torch.autograd.Function):
    """Along each sharded axis in turn (one all-gather per axis; a mesh's second gathers whole rows of
    the first's blocks)."""

    @staticmethod
    def forward(ctx, x, spec):
        ctx.spec = spec
        ctx.ranks = [dist.get_rank(resolve_group(a.group_name)) for a in spec.axis_specs]
        out = x._local
        for a in spec.axis_specs:
            if len(a.lengths) > 1:
                out = all_gather_rows(out, a.dim, a.lengths, a.group_name)
        return out.contiguous() if out is not x._local else out.clone()

    @staticmethod
    def backward(ctx, grad):
        for a, rank in zip(ctx.spec.axis_specs, ctx.ranks):
            start, stop = a.bounds(rank)
            grad = grad.narrow(a.dim, start, stop - start)
        return DomainTensor(grad.contiguous(), ctx.spec), None


def to_dtensor(x: DomainTensor, mesh=None):
    """The DTensor of ``x`` (``Shard(dim)`` on a 1-D mesh over its group); DTensor's own partition must match."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    spec = x._spec
    if not isinstance(spec, DomainSpec):
        raise FxHaloError(
            f"fxhalo.to_dtensor takes a DomainTensor sharded along one dim; this one is split over a mesh ({spec}). "
            "Remedy: DTensor.from_local(x.to_local(), mesh, [Shard(d) for d in x.shard_dim], shape=x.shape)"
        )
    pg = resolve_group(spec.group_name)
    chunks = [len(c) for c in torch.arange(spec.global_length).chunk(len(spec.lengths))]
    chunks += [0] * (len(spec.lengths) - len(chunks))
    if tuple(chunks) != spec.lengths:
        raise FxHaloError(
            f"DTensor splits {spec.global_length} rows over {len(spec.lengths)} ranks as {chunks}, but this "
            f"DomainTensor holds {list(spec.lengths)}; redistribute first or build the DTensor yourself"
        )
    if mesh is None:
        mesh = DeviceMesh.from_group(pg, device_type=x.device.type)
    return DTensor.from_local(x.to_local(), mesh, [Shard(spec.dim)], run_check=False, shape=x.shape, stride=x.stride())


DomainTensor.to_dtensor = to_dtensor  # a method too, as DTensor users expect


def input_mesh(args):
    """The :class:`~fxhalo.mesh.MeshDomain` that the DomainTensors among ``args`` are split over, or ``None``
    when none is split over a mesh.  Raises :class:`FxHaloError` when they are split over different
    domains (two meshes, or a mesh and a one-axis group): a compiled region runs on one."""
    mine = [x for x in args if isinstance(x, DomainTensor)]
    if not any(isinstance(x._spec, MeshSpec) for x in mine):
        return None
    names = {x._spec.group_name for x in mine}
    if len(names) != 1:
        raise FxHaloError(
            f"the model's DomainTensor inputs are split over different domains (groups {sorted(names)}); a "
            "compiled region runs on one. Remedy: make every input with fxhalo.from_local(..., group=mesh) "
            "on the same mesh and mesh axes"
        )
    return mesh_of(names.pop())


def as_meta(x):
    """A DomainTensor with its slab moved to the meta device (same spec and device), for the tools;
    anything else unchanged."""
    if not isinstance(x, DomainTensor):
        return x
    return _static(DomainTensor(x._local.detach().to("meta"), x._spec, tuple(x.shape), device=x.device))


def meta_domain_tensor(x, domain, partition=None):
    """For the one-process tools (explain, validate): the DomainTensor rank ``domain.rank`` would hold
    of the global input ``x``, with a meta slab (no data at any size).

    Parameters, non-tensors and tensors without a dim ``domain.shard_dim`` are
    returned as they are (replicated).  ``partition``: every rank's length (default balanced).
    """
    if not isinstance(x, torch.Tensor) or isinstance(x, (torch.nn.Parameter, DomainTensor)):
        return x
    device = torch.device("cpu") if x.device.type == "meta" else x.device  # the parameters' device, say
    x = x.to("meta")
    dim = domain.shard_dim + x.ndim if domain.shard_dim < 0 else domain.shard_dim
    if not 0 <= dim < x.ndim:
        return x
    n = x.shape[dim]
    lengths = tuple(partition) if partition is not None else domain.lengths(n)
    if len(lengths) != domain.size or sum(lengths) != n or min(lengths) < 0:
        raise FxHaloError(f"partition {list(lengths)} does not split {n} rows over {domain.size} ranks")
    start = sum(lengths[: domain.rank])
    spec = DomainSpec(domain.group_name, dim, lengths)
    return _static(DomainTensor(x.narrow(dim, start, lengths[domain.rank]), spec, tuple(x.shape), device=device))
