"""The ``domain_parallel`` Dynamo backend.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .domain import Domain
from .errors import FxHaloError
from .log import log_rewrite
from .passes import PassContext, known_layouts
from .passes.agreement import check_agreement, fingerprint, gather_input_lengths
from .passes.pipeline import run_pipeline
from .passes.propagate import local_input_lengths

__all__ = ["DomainParallelBackend", "backend", "domain_parallel", "register"]

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclasses.dataclass(frozen=True)
class DomainParallelBackend:
    """A Dynamo backend callable.  Build it with :func:`fxhalo.backend` or through ``options``.

    * ``group``: process group, group name, ``DeviceMesh`` or ``(mesh, axis)``; default WORLD.
    * ``mesh_axis``: the domain axis when ``group`` is a multi-dim ``DeviceMesh``.
    * ``shard_dim``: the sharded tensor dim of activations (default 2, negative counts from the end).
    * ``compiler``: the inner compiler, ``"inductor"`` (default), ``"aot_eager"``, ``"eager"`` or a callable.
    * ``input_shard_dims``: per forward-argument override of the input rule, e.g.
      ``{"mask": None}`` (replicated) or ``{"lat_weights": 0}``.
    * ``fallback``: ``None`` (default: refuse ops without a rule) or ``"gather"``
      (run them on the all-gathered tensors, with a warning per node).
    * ``grad_sync``: ``True`` (default): the gradient of every parameter the graph
      reads is summed over the domain group inside the backward, so every rank
      ends ``backward()`` with the full, identical gradient.  ``False``: each rank
      keeps its partial gradient (sum them yourself).
    * ``fuse_exchanges``: ``True`` (default): a GroupNorm followed (through elementwise
      ops) by a conv sends its statistics and the conv's halo rows in one collective
      (:mod:`fxhalo.passes.fuse`).  ``False``: two collectives, as written.
    """

    group: Any = None
    shard_dim: int = 2
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
        if not isinstance(self.shard_dim, int):
            raise FxHaloError(f"shard_dim must be an int, got {self.shard_dim!r}")

    @property
    def __name__(self) -> str:  # torch.compile names the backend after this
        return "domain_parallel"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if self.group is None and not dist.is_initialized():
            return _inner(self.compiler)(gm, example_inputs)  # one process: the whole tensor is local
        domain = Domain.from_group(self.group, shard_dim=self.shard_dim, mesh_axis=self.mesh_axis)
        if domain.size == 1:
            return _inner(self.compiler)(gm, example_inputs)
        ctx, local, error = None, None, None
        try:
            ctx = PassContext(
                domain,
                dict(self.input_shard_dims),
                self.fallback,
                known_inputs=known_layouts.known(gm, example_inputs),
                grad_sync=self.grad_sync,
                fuse_exchanges=self.fuse_exchanges,
            )
            local = local_input_lengths(gm, ctx)
        except Exception as e:  # every rank must learn of it before anyone runs a collective
            error = e
        try:
            ctx.input_lengths = gather_input_lengths(domain, local, error)
        except FxHaloError as e:
            return _refused(e)
        summary, compiled = None, None
        try:
            transform(gm, example_inputs, ctx)
            log_rewrite(gm, ctx)  # TORCH_LOGS="+fxhalo"; one level check when off
            summary = fingerprint(gm)
            compiled = known_layouts.recording(_inner(self.compiler)(gm, example_inputs), gm)
        except Exception as e:  # every rank must learn of it before anyone runs a collective
            error = e
        try:
            check_agreement(domain, summary, error)
        except FxHaloError as e:
            return _refused(e)
        return compiled


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


def _inner(compiler) -> Callable:
    if callable(compiler):
        return compiler
    if compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager
    from torch._inductor.compile_fx import compile_fx

    return compile_fx


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
