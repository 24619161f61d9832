r"""The ``domain_parallel`` Dynamo backend.

``torch.compile(model, backend="domain_parallel", options={...})`` hands each
captured graph to :class:`DomainParallelBackend`, which

1. learns the global length of every sharded input from the other ranks (one
   small all-gather; shards may be uneven) (:mod:`fxhalo.passes.agreement`),
2. propagates sharding from the inputs (:mod:`fxhalo.passes.propagate`),
3. rewrites every node that reaches across a shard edge into a call to a shared
   kernel in :mod:`fxhalo.ops` (:mod:`fxhalo.passes.rewrite`), and reads the
   parameters through ``grad_sync``'s buckets (:mod:`fxhalo.passes.boundary`),
4. refreshes the fake-tensor metadata of the rewritten graph (steps 2 to 4 are the
   passes of :mod:`fxhalo.passes.pipeline`, which explain and validate run too),
5. hands the graph to the inner compiler; AOTAutograd traces the kernels'
   functional collectives and derives their backward,
6. checks with the other ranks (one more small all-gather) that every rank
   compiled the same thing, or that all of them fail together.

A refusal becomes a compiled function that raises the :class:`FxHaloError`
(see :func:`_refused`).  With one rank, or no process group, the graph goes to
the inner compiler untouched.

**The global view.**  When the inputs are :class:`~fxhalo.DomainTensor`\ s, Dynamo
traced the global program; step 1 is not needed (every input carries its
partition), step 2 is :func:`fxhalo.passes.localize.localize`, and the compiled
function unwraps the DomainTensors, runs the local program and wraps its sharded
outputs as DomainTensors (:func:`_global_view`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .domain import Domain
from .errors import FxHaloError
from .layout import Layout, Sharded, layout_of
from .log import log_rewrite
from .mesh import MeshDomain, is_mesh, mesh_domain, on_several_axes
from .passes import PassContext, known_layouts
from .passes.agreement import check_agreement, fingerprint, gather_input_lengths, gather_mesh_input_lengths
from .passes.pipeline import run_pipeline
from .passes.propagate import local_input_lengths
from .tensor import DomainSpec, DomainTensor, MeshSpec, input_mesh, wrap_local

__all__ = ["DomainParallelBackend", "backend", "domain_parallel", "register"]

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class DomainParallelBackend:
    """A Dynamo backend callable.  Build it with :func:`fxhalo.backend` or through ``options``.

    * ``group``: process group, group name, ``DeviceMesh`` or ``(mesh, axis)``; default WORLD.
    * ``mesh_axis``: the domain axis when ``group`` is a multi-dim ``DeviceMesh``.
    * ``shard_dim``: the sharded tensor dim of activations (default 2, negative counts from the end), or
      a tuple of dims, one per axis of a ``DeviceMesh`` ``group``, in mesh-axis order: a 2-D (or 3-D)
      domain (:mod:`fxhalo.mesh`).
    * ``compiler``: the inner compiler, ``"inductor"`` (default), ``"aot_eager"``, ``"eager"`` or a callable.
    * ``input_shard_dims``: per forward-argument override of the input rule, e.g.
      ``{"mask": None}`` (replicated) or ``{"lat_weights": 0}``.
    * ``fallback``: ``None`` (default: refuse ops without a rule) or ``"gather"``
      (run them on the all-gathered tensors, with a warning per node).
    * ``grad_sync``: ``True`` (default): the gradient of every parameter the graph
      reads is summed over the domain group inside the backward, so every rank
      ends ``backward()`` with the full, identical gradient.  ``False``: each rank
      keeps its partial gradient (sum them yourself).
    * ``fuse_exchanges``: ``True`` (default): a norm (group, instance, batch in training,
      layer without affine terms) followed (through row-wise ops) by a halo op (conv,
      transposed conv, pool, interpolation) sends its statistics and the halo op's rows in
      one collective (:mod:`fxhalo.passes.fuse`).  ``False``: two collectives, as written.
    """

    group: Any = None
    shard_dim: int | tuple[int, ...] = 2
    compiler: str | Callable = "inductor"
    input_shard_dims: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    mesh_axis: str | int | None = None
    fallback: str | None = None
    grad_sync: bool = True
    fuse_exchanges: bool = True

    def __post_init__(self):
        if not callable(self.compiler) and self.compiler not in COMPILERS:
            raise FxHaloError(f"unknown compiler {self.compiler!r}; use one of {COMPILERS} or a callable")
        if self.fallback not in (None, "gather"):
            raise FxHaloError(f"unknown fallback {self.fallback!r}; use None (refuse) or 'gather'")
        dims = self.shard_dim if isinstance(self.shard_dim, (tuple, list)) else (self.shard_dim,)
        if not dims or not all(isinstance(d, int) for d in dims):
            raise FxHaloError(f"shard_dim must be an int or a tuple of ints (one per axis), got {self.shard_dim!r}")
        if isinstance(self.shard_dim, list):  # frozen: set through object.__setattr__
            object.__setattr__(self, "shard_dim", tuple(dims))

    @property
    def __name__(self) -> str:  # torch.compile names the backend after this
        return "domain_parallel"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if any(isinstance(x, DomainTensor) for x in example_inputs):
            return self._global_view(gm, example_inputs)
        shard_dim = self.shard_dim
        if on_several_axes(shard_dim, self.group):
            return self._on_mesh(gm, example_inputs)
        if isinstance(shard_dim, tuple):
            (shard_dim,) = shard_dim
        if self.group is None and not dist.is_initialized():
            return _inner(self.compiler)(gm, example_inputs)  # one process: the whole tensor is local
        domain = Domain.from_group(self.group, shard_dim=shard_dim, mesh_axis=self.mesh_axis)
        if domain.size == 1:
            return _inner(self.compiler)(gm, example_inputs)
        return self._plain(gm, example_inputs, domain)

    def _plain(self, gm: torch.fx.GraphModule, example_inputs, domain: Domain, mesh: MeshDomain | None = None):
        """Compile a graph of local slabs (not DomainTensors) on ``domain``, or on the whole of ``mesh``."""
        ctx, local, error = None, None, None
        try:
            ctx = PassContext(
                domain,
                dict(self.input_shard_dims),
                self.fallback,
                known_inputs=known_layouts.known(gm, example_inputs),
                grad_sync=self.grad_sync,
                fuse_exchanges=self.fuse_exchanges,
                fuse_max_pools=fuses_max_pools(self.compiler),
                mesh=mesh,
            )
            local = local_input_lengths(gm, ctx)
        except Exception as e:  # every rank must learn of it before anyone runs a collective
            error = e
        try:
            if mesh is not None and len(mesh.axes) > 1:
                ctx.input_lengths = gather_mesh_input_lengths(mesh, local, error)
            else:
                ctx.input_lengths = gather_input_lengths(domain, local, error)
        except FxHaloError as e:
            return _refused(e)

        def build():
            transform(gm, example_inputs, ctx)
            log_rewrite(gm, ctx)  # TORCH_LOGS="+fxhalo"; one level check when off
            return fingerprint(gm), known_layouts.recording(compile_local(self.compiler, gm, example_inputs), gm)

        return _agreed(domain, build)

    def _on_mesh(self, gm: torch.fx.GraphModule, example_inputs):
        """A domain of several mesh axes (:mod:`fxhalo.mesh`): the plain path, along every axis."""
        try:
            mesh = mesh_domain(self.group, self.shard_dim, self.mesh_axis)
        except FxHaloError as e:  # the same on every rank: it depends only on the options
            return _refused(e)
        if mesh.whole.size == 1:
            return _inner(self.compiler)(gm, example_inputs)
        return self._plain(gm, example_inputs, mesh.whole if len(mesh.axes) > 1 else mesh.axes[0], mesh)

    def _global_view(self, gm: torch.fx.GraphModule, example_inputs):
        """Compile a graph Dynamo traced on DomainTensors: partition it, compile the local program,
        and return a function of the DomainTensors (see the module docstring)."""
        try:
            domain, mesh = self._global_domain(example_inputs)
        except FxHaloError as e:  # the same on every rank: it depends on the inputs' specs and the options
            return _refused(e)
        local_inputs = [x._local if isinstance(x, DomainTensor) else x for x in example_inputs]

        def build():
            ctx = PassContext(
                domain,
                fallback=self.fallback,
                grad_sync=self.grad_sync,
                fuse_exchanges=self.fuse_exchanges,
                fuse_max_pools=fuses_max_pools(self.compiler),
                global_view=True,
                mesh=mesh,
            )
            transform(gm, local_inputs, ctx)
            outputs = output_specs(gm, ctx)
            log_rewrite(gm, ctx)
            compiled = compile_local(self.compiler, gm, local_inputs)
            # A replicated output comes back as a plain tensor; a later graph (after a graph break) that
            # gets only plain tensors takes the plain path, which must know it is replicated, not a slab.
            return fingerprint(gm), global_view_function(known_layouts.recording(compiled, gm), outputs)

        return _agreed(domain, build)

    def _global_domain(self, example_inputs) -> tuple[Domain, MeshDomain | None]:
        """The domain of a global-view graph: the group of the options, else the DomainTensors' own (when
        they agree on one); a mesh when they are split over several axes (``mesh``: its MeshDomain)."""
        mesh = input_mesh(example_inputs)
        if mesh is None:
            names = {x._spec.group_name for x in example_inputs if isinstance(x, DomainTensor)}
            group = self.group if self.group is not None else (names.pop() if len(names) == 1 else None)
            return Domain.from_group(group, shard_dim=self.shard_dim, mesh_axis=self.mesh_axis), None
        if self.group is not None and is_mesh(self.group):
            given = mesh_domain(self.group, mesh.shard_dims, self.mesh_axis)
            if given.whole.group_name != mesh.whole.group_name:
                raise FxHaloError(
                    "options={'group': ...} names another mesh (or other mesh axes) than the one the DomainTensor "
                    "inputs are split over. Remedy: leave 'group' out; the DomainTensors carry their mesh"
                )
        return mesh.whole, mesh


def _agreed(domain: Domain, build: Callable) -> Callable:
    """``build()`` returns ``(fingerprint, compiled)``; all ranks compile the same, or all get the same refusal.

    Every rank must learn of any rank's failure before anyone runs a collective
    (:func:`fxhalo.passes.agreement.check_agreement`).
    """
    summary, compiled, error = None, None, None
    try:
        summary, compiled = build()
    except Exception as e:
        error = e
    try:
        check_agreement(domain, summary, error)
    except FxHaloError as e:
        return _refused(e)
    return compiled


def output_specs(gm: torch.fx.GraphModule, ctx: PassContext) -> list:
    """For each output of the local program: the spec of a sharded one (a :class:`~fxhalo.tensor.DomainSpec`,
    on a mesh a :class:`~fxhalo.tensor.MeshSpec`), ``None`` for a replicated one (returned as a plain
    tensor, whole on every rank)."""
    axes = ctx.mesh.axes if ctx.on_mesh else (ctx.domain,)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    specs = []
    for arg in pytree.tree_leaves(out_node.args[0]):
        layout = layout_of(arg)
        entries = layout.axes if isinstance(layout, Layout) else (None,) * len(axes)
        per_axis = []
        for axis, s in zip(axes, entries):
            if isinstance(s, Sharded) and not s.contiguous:
                raise FxHaloError(
                    f"the compiled graph returns '{arg.name}', whose shards are interleaved with another dim ({s}); "
                    "a DomainTensor holds one block of rows per rank. Remedy: return the value before the reshape "
                    "that merged the sharded dim under another dim, or reshape it back inside the model."
                )
            per_axis.append(DomainSpec(axis.group_name, s.dim, axis.lengths(s.global_length)) if s else None)
        if not any(per_axis):
            specs.append(None)
        else:
            specs.append(MeshSpec(ctx.domain.group_name, tuple(per_axis)) if ctx.on_mesh else per_axis[0])
    return specs


def global_view_function(compiled: Callable, specs: list) -> Callable:
    """The function Dynamo calls with the DomainTensors: unwrap, run the local program, wrap."""

    def run(*args):
        outs = compiled(*[x.to_local() if isinstance(x, DomainTensor) else x for x in args])
        flat, tree = pytree.tree_flatten(outs)
        wrapped = [y if spec is None else wrap_local(y, spec) for y, spec in zip(flat, specs)]
        return pytree.tree_unflatten(wrapped, tree)

    return run


def transform(gm: torch.fx.GraphModule, example_inputs, ctx: PassContext) -> torch.fx.GraphModule:
    """Run fxhalo's passes (:data:`fxhalo.passes.pipeline.PASSES`) on ``gm`` in place (no collectives).

    Returns ``gm``."""
    return run_pipeline(gm, example_inputs, ctx)


def _refused(error: FxHaloError) -> Callable:
    """A compiled function that raises ``error``.

    Raising from the backend itself would let Dynamo fall back to running the
    original graph eagerly on the local slabs for some exception types (and for
    all of them under ``TORCHDYNAMO_SUPPRESS_ERRORS``), which is silently wrong
    for a domain-parallel model.  A function that raises cannot be fallen back
    from, and the user sees the :class:`FxHaloError` itself.
    """

    def refused(*args, **kwargs):
        raise error

    return refused


def compile_local(compiler, gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Hand the rewritten graph to the inner compiler, with AOTAutograd's common-subexpression
    elimination off.

    That pass merges two functional collectives with equal arguments into one.  Two
    exchanges can be equal on some ranks only (a max-pool's and a repartition's halo
    from the same tensor send the same rows where the partitions happen to agree);
    merging them there, and not on the other ranks, leaves the others waiting in a
    collective these ranks never call.  The partitioner runs inside this call, so the
    patch covers it; other compiles keep their setting.
    """
    inner = _inner(compiler)
    if inner is _compile_fx():  # Inductor: with fxhalo's post-grad pass
        inner = _inductor_for_halos
    with torch._functorch.config.patch(cse=False):
        return inner(gm, example_inputs)


def _inner(compiler) -> Callable:
    if callable(compiler):
        return compiler
    if compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager
    return _compile_fx()


def fuses_max_pools(compiler) -> bool:
    """May a norm's statistics ride with a max pool's rows (:mod:`fxhalo.passes.fuse`) under this inner
    compiler?  Under Inductor only where its C++ is compiled without GCC's loop splitting, which got such a
    backward wrong (:mod:`fxhalo.passes.cpp_flags`); under ``eager`` and ``aot_eager``, yes; under another
    callable, which may end in Inductor, no.  Every rank decides alone: a rank that decided otherwise
    compiled other kernels, and the backend's fingerprint check refuses the graph on every rank."""
    from .passes.cpp_flags import split_loops_off

    if _inner(compiler) is _compile_fx():
        return bool(split_loops_off())
    return not callable(compiler)


def _compile_fx() -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx


def _inductor_for_halos(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Inductor, with fxhalo's post-grad pass after the user's own (:mod:`fxhalo.passes.cat_layout`), and its
    C++ kernels compiled without GCC's loop splitting, which miscompiled a halo's backward
    (:mod:`fxhalo.passes.cpp_flags`), for a rewritten graph.  (With one rank the graph goes to plain
    Inductor: nothing of fxhalo's in it.)"""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    from .passes.cat_layout import ChannelsLastCats
    from .passes.cpp_flags import split_loops_off

    passes = [*get_custom_graph_passes(config.post_grad_custom_post_pass), ChannelsLastCats()]
    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": passes, **split_loops_off()})


def backend(**options) -> DomainParallelBackend:
    """The ``domain_parallel`` backend as a callable: ``torch.compile(m, backend=fxhalo.backend(...))``."""
    return DomainParallelBackend(**options)


def domain_parallel(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any] | None = None, **kwargs):
    """The function registered as ``backend="domain_parallel"``; ``options`` come from ``torch.compile``."""
    settings = dict(options or {})
    known = {f.name for f in dataclasses.fields(DomainParallelBackend)}
    unknown = sorted(set(settings) - known)
    if "mode" in kwargs:
        return _refused(FxHaloError("the domain_parallel backend takes options={...}, not mode="))
    if unknown:
        return _refused(FxHaloError(f"unknown domain_parallel option(s) {unknown}; known options: {sorted(known)}"))
    try:
        backend_fn = DomainParallelBackend(**settings)
    except FxHaloError as e:
        return _refused(e)
    return backend_fn(gm, example_inputs)


def register() -> None:
    """Register ``domain_parallel`` with Dynamo (idempotent; safe alongside the entry point)."""
    from torch._dynamo.backends import registry

    name = "domain_parallel"
    if name in registry._COMPILER_FNS:
        return
    if registry._BACKENDS.get(name) is not None:
        # Found through the torch_dynamo_backends entry point: lookup_backend loads and
        # registers it itself, and would refuse a second registration under the same name.
        return
    registry.register_backend(compiler_fn=domain_parallel, name=name)
