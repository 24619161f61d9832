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
import math
import zlib

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from . import domain as _domain
from .domain import Partitioned, all_gather_rows, balanced_lengths, resolve_group
from .errors import FxHaloError

__all__ = ["DomainSpec", "DomainTensor", "from_local", "shard", "gather", "gather_domain_tensor", "from_dtensor"]


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

    def __str__(self) -> str:
        return f"Shard(dim={self.dim}, partition={list(self.lengths)}, group={self.group_name!r})"


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
        if shape is None:
            shape = list(local.shape)
            shape[spec.dim] = spec.global_length
        shape = tuple(shape)
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
    def partition(self) -> tuple[int, ...]:
        """Every rank's length along the sharded dim."""
        return self._spec.lengths

    @property
    def shard_dim(self) -> int:
        return self._spec.dim

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
    """
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
    slab the plain path and the eager modules take (:func:`fxhalo.domain.shard`).
    """
    if like is not None:
        group, shard_dim, lengths = like._spec.group_name, like._spec.dim, like._spec.lengths
    pg = resolve_group(group)
    size, rank = dist.get_world_size(pg), dist.get_rank(pg)
    dim = shard_dim + x.ndim if shard_dim < 0 else shard_dim
    if not 0 <= dim < x.ndim:
        raise FxHaloError(f"shard_dim={shard_dim} does not exist on a {x.ndim}-D tensor")
    lengths = balanced_lengths(x.shape[dim], size) if lengths is None else tuple(int(n) for n in lengths)
    if len(lengths) != size or sum(lengths) != x.shape[dim] or min(lengths) < 0:
        raise FxHaloError(f"fxhalo.shard: lengths {list(lengths)} do not split {x.shape[dim]} rows over {size} ranks")
    spec = DomainSpec(pg.group_name, dim, lengths)
    start, stop = spec.bounds(rank)
    return wrap_local(x.narrow(dim, start, stop - start).contiguous(), spec)


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
    @staticmethod
    def forward(ctx, x, spec):
        ctx.spec = spec
        pg = resolve_group(spec.group_name)
        ctx.rank = dist.get_rank(pg)
        if len(spec.lengths) == 1:
            return x._local.clone()
        return all_gather_rows(x._local, spec.dim, spec.lengths, spec.group_name).contiguous()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.spec.bounds(ctx.rank)
        return DomainTensor(grad.narrow(ctx.spec.dim, a, b - a).contiguous(), ctx.spec), None


def from_dtensor(dt) -> DomainTensor:
    """A DomainTensor of a DTensor sharded along one tensor dim of a 1-D mesh (``Shard(d)``), no copy.

    DTensor splits like ``torch.chunk``: the lengths are asked from the group.
    """
    from torch.distributed.tensor import Shard

    placements = dt.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard):
        raise FxHaloError(
            f"fxhalo.from_dtensor takes a DTensor sharded along one dim of a 1-D mesh, got placements {placements}"
        )
    return from_local(dt.to_local(), placements[0].dim, dt.device_mesh.get_group())


def to_dtensor(x: DomainTensor, mesh=None):
    """The DTensor of ``x`` (``Shard(dim)`` on a 1-D mesh over its group); DTensor's own partition must match."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    spec = x._spec
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
