"""``fxhalo.explain``: what the ``domain_parallel`` backend does to a model, for one rank.

::

    >>> ex = fxhalo.explain(model, x_local, world_size=4, rank=1)
    >>> print(ex)                  # the table, then the summary
    >>> ex.graph.print_readable()  # the rewritten GraphModule
    >>> ex.to_dict()               # the same, JSON-ready

It traces the model with Dynamo on one rank's input, runs the backend's passes
for that rank, and then runs the rewritten graph once on fake tensors while
watching every functional collective the kernels issue.  The byte counts are
therefore measured from the kernels themselves, not from a table of op costs.

**No process group needed.**  Without one, ``world_size`` (and ``rank``, default
0) say which rank to simulate: explain initialises a ``"fake"`` default process
group (torch's FakeProcessGroup: it communicates nothing) for the duration of
the call and destroys it before returning, so that the kernels can look up their
group by name as they do in a real job.  Inside an initialised group, the real
rank and size are used, and nothing is communicated either: the rewritten graph
runs on fake tensors, whose collectives are metadata only.  So one rank alone may
call explain without hanging the others (as long as the model itself does not
communicate in its forward).  Simulating another size inside a real group is
refused: the kernels would resolve the real group and plan for its size.

**Bytes.**  "Bytes sent" is the size of the buffer this rank hands to each
collective, per call:

============================  ==============================================================
collective                    bytes
============================  ==============================================================
``all_to_all`` (halo)         the rows this rank sends to *other* ranks (its own rows stay)
``all_reduce``                the tensor reduced
``all_gather``                this rank's contribution (everyone receives ``P`` times that)
``reduce_scatter``            this rank's full input (it keeps ``1/P`` of the result)
============================  ==============================================================

What crosses the wire also depends on the algorithm (a ring all_reduce sends
``2(P-1)/P`` of the tensor per rank; a halo all_to_all sends exactly its rows).

**Backward convention.**  Autograd derives the backward of each collective whose
input requires grad: the backward of a halo ``all_to_all`` is an ``all_to_all``
of the same rows in reverse (this rank sends back the gradient of the rows it
*received*, so its backward bytes are its forward received bytes); of an
``all_reduce`` an ``all_reduce`` of the same size; of an ``all_gather`` a
``reduce_scatter`` of ``P`` times the contribution.  The gradient syncs the
backend inserts are the identity forward and one ``all_reduce`` of their inputs'
gradients backward: :func:`fxhalo.ops.grad.replicated_input` for a replicated
activation input that requires grad, and (with ``grad_sync``) the bucket of
parameters; explain counts each of them from its inputs' sizes.  Collectives
run only for values that require grad: nothing under ``torch.no_grad()``, and no
backward for a halo of the (grad-free) model input.

**World size 1.**  The backend hands the graph on unchanged, and so does explain:
no rows, no collectives.

**Logging.**  ``TORCH_LOGS="+fxhalo"`` makes the backend log each rewritten graph,
its table and summary at compile time, on rank 0 (``TORCH_LOGS="fxhalo"``: one
summary line per graph); see :func:`fxhalo.log.log_rewrite`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import sys

import torch
import torch.distributed as dist

from . import measure
from .backend import DomainParallelBackend, fuses_max_pools
from .domain import Domain, resolve_group
from .errors import FxHaloError
from .measure import _with_grad  # noqa: F401  (tests/test_explain.py reads it here)
from .mesh import MeshDomain, mesh_domain, on_several_axes, simulated_rank
from .passes import PassContext, known_layouts
from .passes.pipeline import run_pipeline
from .report import Collective, Explanation, Part, Row
from .tensor import DomainTensor, as_meta, input_mesh, meta_domain_tensor
from .tracing import trace_once

__all__ = ["Collective", "Row", "Explanation", "explain"]


# -- the entry point -------------------------------------------------------------------


def explain(
    model,
    *local_inputs,
    world_size: int | None = None,
    rank: int | None = None,
    global_view: bool = False,
    partition=None,
    **options,
) -> Explanation:
    """Explain what ``torch.compile(model, backend="domain_parallel", options=options)`` does on one rank.

    ``local_inputs`` are one rank's forward arguments (its slabs, or DomainTensors, which
    explain on the meta device, so nothing runs on their data).  With
    ``global_view=True`` they are the *global* inputs instead, best as meta tensors
    (``torch.empty(shape, device="meta")``: no memory at any size); each tensor
    input with a dim ``shard_dim`` becomes a :class:`~fxhalo.DomainTensor` split as
    ``partition`` (every rank's length; default balanced), and explain shows what
    the backend does to the model compiled on DomainTensors.  ``options`` are
    the backend's (``shard_dim``, ``input_shard_dims``, ``fallback``, ``group``,
    ``mesh_axis``; ``compiler`` only decides whether a norm fuses with a max pool, as in
    the backend).  Without a process group, ``world_size`` is required and ``rank``
    defaults to 0; inside one, both default to the real ones.  No collective is run either way.

    The model runs once, eagerly and unchanged, on ``local_inputs`` while Dynamo
    traces it; the trace compiles a fresh copy of ``forward``'s code, so that
    caches of models already compiled in this process are left alone.  Hooks
    registered on the top module are not run.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DomainParallelBackend)})
    if unknown:
        raise FxHaloError(f"unknown domain_parallel option(s) {unknown}")
    settings = DomainParallelBackend(**options)  # validates them as the backend would
    mesh = input_mesh(local_inputs)
    if mesh is not None:  # DomainTensors split over a mesh, inside the job that made them: that mesh, this rank
        return _explain(model, tuple(as_meta(x) for x in local_inputs), mesh.whole, settings, mesh)
    if on_several_axes(settings.shard_dim, settings.group):
        if global_view:
            raise FxHaloError(
                "fxhalo.explain(global_view=True) on a mesh of several axes from plain tensors is not supported "
                "yet. Remedy: pass the DomainTensors themselves (fxhalo.shard(x, shard_dim=(2, 3), group=mesh)) "
                "inside the job, or explain one rank's local block (global_view=False)"
            )
        with _mesh(settings, world_size, rank) as mesh:
            return _explain(model, tuple(as_meta(x) for x in local_inputs), mesh.whole, settings, mesh)
    with _domain(settings, world_size, rank) as domain:
        if global_view:
            local_inputs = tuple(meta_domain_tensor(x, domain, partition) for x in local_inputs)
        local_inputs = tuple(as_meta(x) for x in local_inputs)  # DomainTensors: explained, never run
        return _explain(model, local_inputs, domain, settings)


@contextlib.contextmanager
def _domain(settings, world_size: int | None, rank: int | None):
    """The domain to explain; inside it, the kernels' group name resolves to a process group."""
    if settings.group is not None or dist.is_initialized():
        pg = resolve_group(settings.group, settings.mesh_axis)
        real_size, real_rank = dist.get_world_size(pg), dist.get_rank(pg)
        if (world_size, rank) != (None, None) and (world_size or real_size, real_rank if rank is None else rank) != (
            real_size,
            real_rank,
        ):
            raise FxHaloError(
                f"inside an initialised process group fxhalo.explain describes this process: rank {real_rank} of "
                f"{real_size}, not world_size={world_size}, rank={rank}. To simulate other ranks or sizes, call it "
                "in a process without a process group, or use `python -m fxhalo explain`."
            )
        yield Domain(pg.group_name, real_rank, real_size, settings.shard_dim)
        return
    if world_size is None:
        raise FxHaloError("fxhalo.explain needs world_size=... when no process group is initialised")
    rank = 0 if rank is None else rank
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise FxHaloError(f"fxhalo.explain: rank {rank} is not a rank of world_size={world_size}")
    if world_size == 1:  # the backend does nothing: no group to simulate
        yield Domain("fxhalo-explain", 0, 1, settings.shard_dim)
        return
    # torch's fake process group: init and collectives return at once and move no data.
    # init_process_group also installs a "[rankN]:" excepthook that destroy leaves behind.
    excepthook = sys.excepthook
    dist.init_process_group("fake", rank=rank, world_size=world_size)
    try:
        yield Domain.from_group(None, shard_dim=settings.shard_dim)
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


@contextlib.contextmanager
def _mesh(settings, world_size, rank: int | None):
    """The :class:`~fxhalo.mesh.MeshDomain` to explain: the options' mesh inside a process group, or a
    mesh of shape ``world_size`` over torch's fake process group (no process group)."""
    if settings.group is not None or dist.is_initialized():
        mesh = mesh_domain(settings.group, settings.shard_dim, settings.mesh_axis)
        asked = (tuple(world_size) if world_size is not None else mesh.shape, mesh.whole.rank if rank is None else rank)
        if asked != (mesh.shape, mesh.whole.rank):
            raise FxHaloError(
                f"inside an initialised process group fxhalo.explain describes this process: rank "
                f"{mesh.whole.rank} of the {mesh.shape} mesh, not world_size={world_size}, rank={rank}"
            )
        yield mesh
        return
    dims = settings.shard_dim
    rank = simulated_rank(world_size, dims, rank, "fxhalo.explain")
    total = math.prod(world_size)
    from torch.distributed.device_mesh import init_device_mesh

    excepthook = sys.excepthook
    dist.init_process_group("fake", rank=rank, world_size=total)
    try:
        names = tuple(f"dim{d}" for d in dims)  # the report names each axis by the dim it shards
        yield mesh_domain(init_device_mesh("cpu", world_size, mesh_dim_names=names), dims)
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook


def _explain(model, local_inputs, domain: Domain, settings, mesh: MeshDomain | None = None) -> Explanation:
    parts: list[Part] = []
    notes: list[str] = []
    grad = torch.is_grad_enabled()

    def capture(gm: torch.fx.GraphModule, example_inputs):
        index = len(parts)
        try:
            part = _explain_graph(gm, example_inputs, domain, settings, index, grad, mesh)
        except Exception as e:  # a bug in a pass: a row says so, and the trace goes on
            part = Part(
                index, None, [measure.problem_row(index, "<graph>", "", "", _first_line(e))], collections.Counter()
            )
        parts.append(part)
        # Run the unrewritten code (the model on the local slab, as Dynamo traced it); later
        # graphs learn the layouts of this graph's outputs, as in the backend.
        return known_layouts.recording(gm.forward, part.graph) if part.graph is not None else gm.forward

    failure = trace_once(model, local_inputs, capture)
    if failure is not None:
        row = measure.problem_row(len(parts), type(model).__name__, "", "", FxHaloError(failure))
        parts.append(Part(len(parts), None, [row], collections.Counter()))
    if domain.size == 1:
        notes.append("world size 1: the backend hands each graph to the inner compiler unchanged")
    if not parts:
        notes.append("Dynamo captured no graph (the model ran eagerly; nothing to rewrite)")
    if mesh is not None:
        return Explanation(world_size=mesh.shape, rank=domain.rank, shard_dim=mesh.shard_dims, parts=parts, notes=notes)
    return Explanation(world_size=domain.size, rank=domain.rank, shard_dim=domain.shard_dim, parts=parts, notes=notes)


def _explain_graph(gm, example_inputs, domain: Domain, settings, index: int, grad: bool, mesh=None) -> Part:
    """Rewrite a copy of ``gm`` as the backend would for ``domain`` and measure its collectives.

    The backend's passes run with every refusal collected: the refused nodes are left
    as they are and the rest is rewritten, so that one call lists every problem next
    to what would work.
    """
    graph = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # meta is shared, not copied: cheap
    if domain.size == 1:
        return Part(
            index, graph, [], collections.Counter(measure.spelled(n) for n in graph.graph.nodes if measure.is_call(n))
        )
    for n in graph.graph.nodes:
        if measure.is_call(n):
            n.meta[measure.ORIGIN] = (n.name, measure.spelled(n))
    problems: list = []
    ctx = _context(domain, settings, gm, example_inputs, mesh)
    example_inputs = [getattr(x, "_local", x) for x in example_inputs]  # DomainTensors: their slabs
    run_pipeline(graph, example_inputs, ctx, problems=problems)
    refused = [(node, err) for node, err in problems if node is not None]
    failed = [err for node, err in problems if node is None]
    rows: list[Row] = []
    if not failed:
        try:
            rows = measure.measure_rows(graph, index, grad, domain.size, mesh.labels() if mesh else None)
        except Exception as e:
            failed.append(e)
    if failed:  # a refusal upstream can leave shapes the rest cannot be planned with
        rows = [measure.problem_row(index, "<rest of graph>" if refused else "<graph>", "", "", _first_line(failed[0]))]
    if not refused:
        return Part(index, graph, rows, measure.local_nodes(graph))
    refused_rows = [
        measure.problem_row(
            index, node.name, measure.spelled(node), measure.where(node), err, measure.sharding_dim(node)
        )
        for node, err in refused
    ]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    merged = sorted(refused_rows + rows, key=lambda r: order.get(r.node, len(order)))
    return Part(index, graph, merged, measure.local_nodes(graph, skip={n.name for n, _ in refused}))


def _first_line(e: BaseException) -> FxHaloError:
    """FxHaloErrors are written to be read whole; other errors (FX's lint dumps the graph) are cut."""
    if isinstance(e, FxHaloError):
        return e
    text = str(e).splitlines()
    return FxHaloError(f"{type(e).__name__}: {text[0] if text else ''}")


def _context(domain: Domain, settings, gm, example_inputs, mesh=None) -> PassContext:
    """The backend's PassContext, without the compile-time all_gather of the inputs' lengths.

    A placeholder whose global length the context does not know is taken to be
    evenly sharded, which is what one rank's input can tell.
    """
    fields = {f.name for f in dataclasses.fields(PassContext)}
    extra = {
        name: getattr(settings, name)
        for name in ("grad_sync", "fuse_exchanges")
        if name in fields and hasattr(settings, name)
    }
    extra["fuse_max_pools"] = fuses_max_pools(settings.compiler)  # as the backend decides
    if any(isinstance(x, DomainTensor) for x in example_inputs):  # traced at global shapes
        return PassContext(domain, fallback=settings.fallback, global_view=True, mesh=mesh, **extra)
    return PassContext(
        domain,
        dict(settings.input_shard_dims),
        settings.fallback,
        known_inputs=known_layouts.known(gm, example_inputs),
        mesh=mesh,
        **extra,
    )
