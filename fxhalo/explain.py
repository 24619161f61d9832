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
summary line per graph); see :func:`log_rewrite`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import operator
import os
import re
import sys
import types

import tabulate
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import halo as _halo
from .domain import Domain, resolve_group
from .errors import FxHaloError, _public_name, user_source
from .ops import grad as _grad_ops
from .ops import moments as _reduce_ops
from .passes import PassContext, layouts, propagate_sharding, rewrite
from .passes.boundary import wrap_replicated_boundaries
from .passes.fuse import fuse
from .passes.meta import refresh_meta
from .rules import DECISION
from .sharding import SHARDING, Sharded

__all__ = ["Collective", "Row", "Explanation", "explain", "log_rewrite"]

log = logging.getLogger(__name__)

# TORCH_LOGS="+fxhalo" works through torch's module-name fallback even before fxhalo is
# imported (torch parses the variable when it is imported, and an artifact name it does
# not know yet would be an error there).  Registering the alias also makes
# torch._logging.set_logs(modules={"fxhalo": logging.DEBUG}) work without walking the package.
torch._logging._internal.register_log("fxhalo", "fxhalo")

_ORIGIN = "fxhalo_explain_origin"  # (node name, op) before the rewrite; the rewrite copies meta over
# Where the kernels hold their halo plan: the exchange primitive, and the norm-and-halo exchange.
_HALO_CODES = (_halo.halo_exchange.__code__, _reduce_ops.global_moments_with_rows.__code__)

# The kernels build their Edge themselves, so only the conv kernel names its edge mode in
# the graph (``edge_mode=``).  For the others the edge follows from the op.
_KERNEL_EDGES = {"max_pool": "-inf", "avg_pool": "zeros", "interpolate": "clamp", "conv_transpose": "zeros"}

_COLLECTIVES = {  # functional collective -> the kind reported
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}
# Kernels that are the identity forward and all-reduce their inputs' gradients in the backward:
# a replicated activation input, and (grad_sync) a bucket of parameters.
_SYNC_IN_BACKWARD = tuple(
    f for f in (getattr(_grad_ops, name, None) for name in ("replicated_input", "synced_params")) if f is not None
)
_ORDER = {kind: i for i, kind in enumerate(("all_to_all", "all_reduce", "all_gather", "reduce_scatter"))}
_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")


# -- what one row says ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective a kernel issued in the forward (see the module docstring for ``bytes``)."""

    kind: str  # "all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast"
    bytes: int  # sent by this rank, per call
    received: int  # received by this rank, per call
    requires_grad: bool  # autograd will run its backward
    group_size: int = 1

    def backward(self) -> Collective | None:
        """The collective autograd runs for this one in the backward (the module's convention)."""
        if not self.requires_grad:
            return None
        if self.kind == "all_to_all":
            return Collective("all_to_all", self.received, self.bytes, False, self.group_size)
        if self.kind == "all_reduce":
            return Collective("all_reduce", self.bytes, self.bytes, False, self.group_size)
        if self.kind == "all_gather":
            full = self.bytes * self.group_size
            return Collective("reduce_scatter", full, self.bytes, False, self.group_size)
        if self.kind == "reduce_scatter":
            return Collective("all_gather", self.received, self.bytes, False, self.group_size)
        return None


@dataclasses.dataclass(frozen=True)
class Row:
    """One node the backend marked: a kernel call it inserted, or a node it refused."""

    graph: int
    node: str  # the node's name before the rewrite
    op: str  # the op as the user's code spelled it (torch.conv2d, torch.nn.functional.group_norm, ...)
    kernel: str  # the fxhalo kernel that replaced it ("" for a refusal)
    source: str  # file:line in the user's code
    shard_dim: int | None
    halo: tuple[tuple[int, int], ...] = ()  # (lo, hi) rows of each halo exchange, fill rows included
    edge: str = ""
    collectives: tuple[Collective, ...] = ()
    backward: tuple[Collective, ...] = ()
    error: str = ""  # the FxHaloError of a refused node

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes for c in self.collectives)

    @property
    def refused(self) -> bool:
        return bool(self.error)

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "node": self.node,
            "op": self.op,
            "kernel": self.kernel,
            "source": self.source,
            "shard_dim": self.shard_dim,
            "halo": [list(h) for h in self.halo],
            "edge": self.edge,
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
            "backward": [dataclasses.asdict(c) for c in self.backward],
            "bytes_sent": self.bytes_sent,
            "error": self.error,
        }


@dataclasses.dataclass
class _Part:
    """One Dynamo graph, explained."""

    index: int
    graph: torch.fx.GraphModule | None
    rows: list[Row]
    local: collections.Counter  # op -> how many nodes of it run locally on the slab


class Explanation:
    """What the backend does for one rank: :attr:`table`, :attr:`graph`, :attr:`summary`, :meth:`to_dict`."""

    def __init__(self, *, world_size: int, rank: int, shard_dim: int, parts: list[_Part], notes: list[str]):
        self.world_size, self.rank, self.shard_dim = world_size, rank, shard_dim
        self._parts = parts
        self.notes = notes

    # -- contents ------------------------------------------------------------
    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        """The rewritten graphs, one per Dynamo graph (more than one after a graph break)."""
        return [p.graph for p in self._parts if p.graph is not None]

    @property
    def graph(self) -> torch.fx.GraphModule | None:
        """The rewritten GraphModule (the first, when graph breaks gave several; see :attr:`graphs`)."""
        graphs = self.graphs
        return graphs[0] if graphs else None

    @property
    def rows(self) -> list[Row]:
        return [r for p in self._parts for r in p.rows]

    @property
    def problems(self) -> list[Row]:
        """Rows of refused nodes (and of models torch could not trace): each makes the backend refuse."""
        return [r for r in self.rows if r.refused]

    @property
    def local_nodes(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for p in self._parts:
            total.update(p.local)
        return total

    def forward(self) -> list[Collective]:
        return [c for r in self.rows for c in r.collectives]

    def backward(self) -> list[Collective]:
        return [c for r in self.rows for c in r.backward]

    # -- text ----------------------------------------------------------------
    @property
    def table(self) -> str:
        """A ``tabulate`` table: one row per marked node, then one line counting the local ones."""
        several = len(self._parts) > 1
        errors = any(r.refused for r in self.rows)
        headers = (["graph"] if several else []) + [
            "node",
            "op",
            "source",
            "dim",
            "halo lo/hi",
            "edge",
            "collective",
            "bytes sent",
        ]
        headers += ["problem"] if errors else []
        body = []
        for r in self.rows:
            cells = [
                r.node,
                r.op,
                r.source or "-",
                "-" if r.shard_dim is None else r.shard_dim,
                ", ".join(f"{lo}/{hi}" for lo, hi in r.halo) or "-",
                r.edge or "-",
                "REFUSED" if r.refused else _kinds(r),
                "" if r.refused else f"{r.bytes_sent:,}",
            ] + ([r.error] if errors else [])
            body.append(([r.graph] if several else []) + cells)
        widths = [None] * (len(headers) - 1) + [72 if errors else None]
        text = (
            tabulate.tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True, maxcolwidths=widths)
            if body
            else "(no node needs a collective)"
        )
        return f"{text}\n{self._local_line()}"

    def _local_line(self) -> str:
        local = self.local_nodes
        if not local:
            return "local: none"
        kinds = ", ".join(f"{n} x {op}" for op, n in local.most_common())
        n = sum(local.values())
        return f"local: {n} {'node needs' if n == 1 else 'nodes need'} no collective ({kinds})"

    @property
    def summary(self) -> str:
        """Collectives and bytes per forward (and per backward when anything requires grad)."""
        graphs = len(self._parts)
        lines = [
            f"rank {self.rank} of {self.world_size}, shard_dim {self.shard_dim}, "
            f"{graphs} graph{'s' if graphs != 1 else ''}"
        ]
        lines.append("forward:  " + _totals(self.forward()))
        back = self.backward()
        if back:
            lines.append("backward: " + _totals(back))
        problems = self.problems
        if problems:
            lines.append(
                f"REFUSED: {len(problems)} problem{'s' if len(problems) != 1 else ''}; the backend "
                "would raise the first of them (FxHaloError) instead of compiling"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table}\n\n{self.summary}"

    def __repr__(self) -> str:
        return (
            f"<Explanation rank {self.rank} of {self.world_size}: {len(self.rows)} rows, "
            f"{len(self.forward())} forward collectives>"
        )

    def to_dict(self) -> dict:
        """Everything in JSON-ready form (no tensors, no graph objects; the graphs as code)."""
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "shard_dim": self.shard_dim,
            "rows": [r.to_dict() for r in self.rows],
            "local_nodes": dict(self.local_nodes),
            "forward": _totals_dict(self.forward()),
            "backward": _totals_dict(self.backward()),
            "problems": len(self.problems),
            "graphs": [g.code for g in self.graphs],
            "notes": list(self.notes),
        }


def _kinds(row: Row) -> str:
    if row.collectives:
        return "+".join(c.kind for c in row.collectives)
    if row.backward:  # a gradient sync: nothing in the forward
        return "backward " + "+".join(c.kind for c in row.backward)
    return "none"


def _totals(calls: list[Collective]) -> str:
    if not calls:
        return "no collectives"
    by_kind: dict[str, list[int]] = {}
    for c in sorted(calls, key=lambda c: _ORDER.get(c.kind, len(_ORDER))):
        entry = by_kind.setdefault(c.kind, [0, 0])
        entry[0] += 1
        entry[1] += c.bytes
    kinds = ", ".join(f"{n} x {kind} ({_human(b)})" for kind, (n, b) in by_kind.items())
    total = sum(c.bytes for c in calls)
    return (
        f"{len(calls)} collective{'s' if len(calls) != 1 else ''} per call: {kinds}; {_human(total)} sent by this rank"
    )


def _totals_dict(calls: list[Collective]) -> dict:
    kinds: dict[str, dict] = {}
    for c in calls:
        entry = kinds.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return {"collectives": len(calls), "bytes": sum(c.bytes for c in calls), "by_kind": kinds}


def _human(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


# -- the entry point -------------------------------------------------------------------


def explain(model, *local_inputs, world_size: int | None = None, rank: int | None = None, **options) -> Explanation:
    """Explain what ``torch.compile(model, backend="domain_parallel", options=options)`` does on one rank.

    ``local_inputs`` are one rank's forward arguments (its slabs).  ``options`` are
    the backend's (``shard_dim``, ``input_shard_dims``, ``fallback``, ``group``,
    ``mesh_axis``; ``compiler`` is accepted and ignored).  Without a process group,
    ``world_size`` is required and ``rank`` defaults to 0; inside one, both default
    to the real ones.  No collective is run either way.

    The model runs once, eagerly and unchanged, on ``local_inputs`` while Dynamo
    traces it; the trace compiles a fresh copy of ``forward``'s code, so that
    caches of models already compiled in this process are left alone.  Hooks
    registered on the top module are not run.
    """
    from .backend import DomainParallelBackend  # backend.py imports this module for its log hook

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DomainParallelBackend)})
    if unknown:
        raise FxHaloError(f"unknown domain_parallel option(s) {unknown}")
    settings = DomainParallelBackend(**options)  # validates them as the backend would
    with _domain(settings, world_size, rank) as domain:
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


def _explain(model, local_inputs, domain: Domain, settings) -> Explanation:
    parts: list[_Part] = []
    notes: list[str] = []
    grad = torch.is_grad_enabled()

    def capture(gm: torch.fx.GraphModule, example_inputs):
        index = len(parts)
        try:
            part = _explain_graph(gm, example_inputs, domain, settings, index, grad)
        except Exception as e:  # a bug in a pass: a row says so, and the trace goes on
            part = _Part(index, None, [_problem_row(index, "<graph>", "", "", _first_line(e))], collections.Counter())
        parts.append(part)
        # Run the unrewritten code (the model on the local slab, as Dynamo traced it); later
        # graphs learn the layouts of this graph's outputs, as in the backend.
        return layouts.recording(gm.forward, part.graph) if part.graph is not None else gm.forward

    fn = _fresh_callable(model)
    try:
        torch.compile(fn, backend=capture, dynamic=False)(*local_inputs)
    except Exception as e:  # torch could not run the model on the local shape
        message = str(e).splitlines()[0] if str(e) else ""
        parts.append(
            _Part(
                len(parts),
                None,
                [
                    _problem_row(
                        len(parts),
                        type(model).__name__,
                        "",
                        "",
                        FxHaloError(
                            f"torch could not trace the model on the local input: {type(e).__name__}: {message}"
                        ),
                    )
                ],
                collections.Counter(),
            )
        )
    if domain.size == 1:
        notes.append("world size 1: the backend hands each graph to the inner compiler unchanged")
    if not parts:
        notes.append("Dynamo captured no graph (the model ran eagerly; nothing to rewrite)")
    return Explanation(world_size=domain.size, rank=domain.rank, shard_dim=domain.shard_dim, parts=parts, notes=notes)


def _fresh_callable(model):
    """``model``'s forward with a code object of its own.

    Dynamo keeps its compiled code on the code object (with guards and a recompile
    limit).  Compiling a copy gives explain a cache of its own, so that it neither
    reuses nor crowds out what the user compiled already; ``torch._dynamo.reset()``,
    the alternative, would make every compiled model recompile on this rank alone,
    and a rank that recompiles alone hangs in the backend's agreement check.
    """
    model = getattr(model, "_orig_mod", model)  # an already-compiled module: explain the model itself
    if isinstance(model, torch.nn.Module):
        fn, bound = type(model).forward, model
    elif isinstance(model, types.MethodType):
        fn, bound = model.__func__, model.__self__
    elif isinstance(model, types.FunctionType):
        fn, bound = model, None
    else:
        return model
    copy_fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy_fn.__kwdefaults__ = fn.__kwdefaults__
    copy_fn.__qualname__ = fn.__qualname__
    return types.MethodType(copy_fn, bound) if bound is not None else copy_fn


def _explain_graph(gm, example_inputs, domain: Domain, settings, index: int, grad: bool) -> _Part:
    """Rewrite a copy of ``gm`` as the backend would for ``domain`` and measure its collectives."""
    from .backend import transform

    if domain.size == 1:
        graph = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        calls = collections.Counter(_spelled(n) for n in graph.graph.nodes if _is_call(n))
        return _Part(index, graph, [], calls)

    def fresh():
        graph = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # meta is shared, not copied: cheap
        for n in graph.graph.nodes:
            if _is_call(n):
                n.meta[_ORIGIN] = (n.name, _spelled(n))
        return graph, _context(domain, settings, gm, example_inputs)

    graph, ctx = fresh()
    try:
        transform(graph, example_inputs, ctx)  # exactly the backend's passes
        return _Part(index, graph, _rows(graph, index, grad, domain.size), _local(graph))
    except Exception:  # FxHaloError: a refusal; anything else: a pass failed (reported below)
        pass
    # Something was refused.  Collect every refusal, leave the refused nodes as they are and
    # rewrite the rest, so that one call lists every problem next to what would work.
    graph, ctx = fresh()
    problems: list = []
    propagate_sharding(graph, ctx, problems=problems)
    for node, _ in problems:
        node.meta.pop(DECISION, None)
    refused = [
        _problem_row(index, node.name, _spelled(node), _where(node), err, _sharding_dim(node)) for node, err in problems
    ]
    try:
        rewrite(graph, ctx)
        fuse(graph, ctx)
        wrap_replicated_boundaries(graph, ctx)
        refresh_meta(graph, example_inputs)
        rows = _rows(graph, index, grad, domain.size)
    except Exception as e:  # a refusal upstream can leave shapes the rest cannot be planned with
        rows = [_problem_row(index, "<rest of graph>" if problems else "<graph>", "", "", _first_line(e))]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    merged = sorted(refused + rows, key=lambda r: order.get(r.node, len(order)))
    return _Part(index, graph, merged, _local(graph, skip={n.name for n, _ in problems}))


def _first_line(e: BaseException) -> FxHaloError:
    """FxHaloErrors are written to be read whole; other errors (FX's lint dumps the graph) are cut."""
    if isinstance(e, FxHaloError):
        return e
    text = str(e).splitlines()
    return FxHaloError(f"{type(e).__name__}: {text[0] if text else ''}")


def _context(domain: Domain, settings, gm, example_inputs) -> PassContext:
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
    return PassContext(
        domain,
        dict(settings.input_shard_dims),
        settings.fallback,
        known_inputs=layouts.known(gm, example_inputs),
        **extra,
    )


def _problem_row(index: int, node: str, op: str, source: str, error: BaseException, dim=None) -> Row:
    return Row(index, node, op, "", source, dim, error=str(error) or type(error).__name__)


def _sharding_dim(node) -> int | None:
    for a in (node, *node.all_input_nodes):
        s = a.meta.get(SHARDING) if hasattr(a, "meta") else None
        if isinstance(s, Sharded):
            return s.dim
    return None


# -- rows from a rewritten graph ------------------------------------------------------


def _is_call(node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def _is_kernel(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__module__", "").startswith("fxhalo.")


def _spelled(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    return _public_name(node.target)


def _origin(node) -> tuple[str, str]:
    """``(name, op)`` of the node the kernel replaced.

    explain stamps it before the rewrite; in the backend's log (no stamp) Dynamo's
    ``source_fn_stack`` names the module or function the user called.
    """
    if _ORIGIN in node.meta:
        return node.meta[_ORIGIN]
    stack = node.meta.get("source_fn_stack")
    if stack:
        name, fn = stack[-1]
        if isinstance(fn, type):
            mod = fn.__module__
            return name, f"nn.{fn.__name__}" if mod.startswith("torch.nn.") else f"{mod}.{fn.__name__}"
        return name, _public_name(fn)
    return node.name, _kernel_name(node.target)


def _kernel_name(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}".removeprefix("fxhalo.")


def _where(node) -> str:
    """``file:line`` of the node in the user's code.

    :func:`fxhalo.errors.user_source` skips fxhalo's own files and then falls back to
    the module path; a model that lives in fxhalo (``fxhalo.models``) still has a line.
    """
    text = user_source(node)
    if text == "<source unknown>":
        return ""
    if text.startswith("module "):
        # Dynamo's names for the compiled module ("L['self'].enc.conv1") read better without the root.
        text = re.sub(r"L\['(?:self|fn)'\](?:\.__self__)?\.?", "", text)
        frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
        if not frames:
            return text
        path, line = frames[-1]
    else:
        m = re.match(r"(.*?):(\d+)(?::|$)", text)
        if not m:
            return text
        path, line = m.groups()
    try:
        rel = os.path.relpath(path)
        path = path if rel.startswith("..") else rel
    except ValueError:  # another drive
        pass
    return f"{path}:{line}"


def _edge(node, halos) -> str:
    if not halos:
        return ""
    mode = node.kwargs.get("edge_mode")
    if mode is not None:
        return f"constant {node.kwargs.get('edge_value', 0.0):g}" if mode == "constant" else mode
    name = getattr(node.target, "__name__", "")
    return next((edge for prefix, edge in _KERNEL_EDGES.items() if name.startswith(prefix)), "")


def _local(graph, skip=()) -> collections.Counter:
    """Ops that read or produce a sharded value and run on the slab unchanged."""
    local: collections.Counter = collections.Counter()
    for n in graph.graph.nodes:
        if not _is_call(n) or _is_kernel(n) or n.name in skip:
            continue
        if n.target is operator.getitem and _is_kernel(n.args[0]):
            continue  # one output of a kernel that returns several
        if n.meta.get(SHARDING) is not None or any(a.meta.get(SHARDING) is not None for a in n.all_input_nodes):
            local[_origin(n)[1] if _ORIGIN in n.meta else _spelled(n)] += 1
    return local


def _rows(graph, index: int, grad: bool, size: int) -> list[Row]:
    seen = _measure(graph, grad, size)
    rows = []
    for n in graph.graph.nodes:
        if not _is_kernel(n):
            continue
        name, op = _origin(n)
        calls = tuple(seen.calls.get(n.name, ()))
        halos = tuple((p.lo, p.hi) for p in seen.halos.get(n.name, ()))
        backward = [c.backward() for c in calls] + seen.backward_only.get(n.name, [])
        rows.append(
            Row(
                index,
                name,
                op,
                _kernel_name(n.target),
                _where(n),
                n.kwargs.get("shard_dim", _sharding_dim(n)),
                halos,
                _edge(n, halos),
                calls,
                tuple(b for b in backward if b is not None),
            )
        )
    return rows


# -- measuring the collectives ----------------------------------------------------------


def _collective_kind(func) -> str | None:
    packet = getattr(func, "_overloadpacket", func)
    qualified = getattr(packet, "_qualified_op_name", "")
    namespace, _, name = qualified.partition("::")
    return _COLLECTIVES.get(name) if namespace in _NAMESPACES else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Watch(TorchFunctionMode):
    """Records, per graph node, each functional collective and each halo plan its kernel uses.

    A torch-function mode sees the calls above autograd, where ``requires_grad`` still
    tells whether the backward will run the collective.  The halo plan is read from
    the frame of :func:`fxhalo.halo.halo_exchange`, the one primitive every windowed
    kernel exchanges through, at its first torch call.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size  # the domain's, for collectives whose arguments do not say
        self.node: str | None = None
        self.calls: dict[str, list[Collective]] = collections.defaultdict(list)
        self.halos: dict[str, list] = collections.defaultdict(list)
        self.backward_only: dict[str, list[Collective]] = collections.defaultdict(list)
        self._frame = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _collective_kind(func)
        if kind is not None:
            self._collective(kind, args, kwargs)
        else:
            caller = sys._getframe(1)
            if caller.f_code in _HALO_CODES and caller is not self._frame:
                self._frame = caller
                self.halos[self.node].append(caller.f_locals["plan"])
        return func(*args, **kwargs)

    def _collective(self, kind: str, args, kwargs) -> None:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        sent = sum(_nbytes(t) for t in tensors)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        size, received = self.size, sent
        if kind == "all_to_all":
            x, out_splits, in_splits, group = args[0], args[1], args[2], args[3]
            row = math.prod(x.shape[1:]) * x.element_size()
            own = dist.get_rank(resolve_group(group))
            sent -= int(in_splits[own]) * row  # a rank's copy to itself never leaves it
            received = (sum(int(s) for s in out_splits) - int(out_splits[own])) * row
            size = len(out_splits)
        elif kind in ("all_gather", "reduce_scatter"):
            size = next((int(a) for a in args[1:] if isinstance(a, int)), 1)
            received = sent * size if kind == "all_gather" else sent // max(size, 1)
        self.calls[self.node].append(Collective(kind, sent, received, needs_grad, size))


class _Measure(torch.fx.Interpreter):
    def __init__(self, gm, watch: _Watch):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n):
        self.watch.node = n.name
        if n.op == "call_function" and n.target in _SYNC_IN_BACKWARD and torch.is_grad_enabled():
            # Identity forward, one all_reduce of the inputs' gradients in a hand-written
            # backward: nothing to see in the forward, so count it from the inputs.
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(t.requires_grad for t in tensors):
                nbytes = sum(_nbytes(t) for t in tensors)
                self.watch.backward_only[n.name].append(
                    Collective("all_reduce", nbytes, nbytes, False, self.watch.size)
                )
        return super().run_node(n)


def _measure(graph: torch.fx.GraphModule, grad: bool, size: int) -> _Watch:
    """Run ``graph`` once on its fake example values, recording what the kernels communicate.

    Functional collectives on fake tensors only compute metadata, so this is safe
    inside a real process group too.
    """
    watch = _Watch(size)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    modes = [a.fake_mode for a in fakes if isinstance(a, FakeTensor)]
    if not modes:
        return watch
    with modes[0], torch.set_grad_enabled(grad), watch:
        fakes = [_with_grad(n, f) for n, f in zip(placeholders, fakes)]
        _Measure(graph, watch).run(*fakes)
    return watch


def _with_grad(node, fake):
    """``fake``, requiring grad when the real input does.

    The meta refresh stores detached values (``FakeTensorProp`` snapshots them), so
    the placeholders' fakes no longer say which inputs require grad; Dynamo's
    ``grapharg`` still knows.
    """
    if not isinstance(fake, torch.Tensor) or fake.requires_grad or not fake.dtype.is_floating_point:
        return fake
    grapharg = node.meta.get("grapharg")
    wanted = getattr(getattr(grapharg, "fake_tensor", None), "requires_grad", None)
    if wanted is None:
        try:
            real = grapharg.example  # a weak reference: the input may be gone
        except Exception:
            real = None
        wanted = isinstance(real, torch.Tensor) and real.requires_grad
    return fake.detach().requires_grad_() if wanted else fake


# -- the backend's log ------------------------------------------------------------------


def log_rewrite(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Log a graph the backend just rewrote (``TORCH_LOGS="+fxhalo"``), on rank 0.

    INFO: one summary line; DEBUG: the rewritten code, the table and the summary.
    With the log off it costs one level check.  It never fails the compilation:
    if describing the graph goes wrong, that is logged instead.
    """
    if not log.isEnabledFor(logging.INFO) or ctx.domain.rank != 0:
        return
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
        label = f"graph {compile_id}" if compile_id is not None else "graph"
        part = _Part(0, gm, _rows(gm, 0, torch.is_grad_enabled(), ctx.domain.size), _local(gm))
        ex = Explanation(
            world_size=ctx.domain.size, rank=ctx.domain.rank, shard_dim=ctx.domain.shard_dim, parts=[part], notes=[]
        )
        log.info("fxhalo rewrote %s: forward %s", label, _totals(ex.forward()))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "fxhalo rewrote %s for rank %d of %d:\n%s\n%s\n\n%s",
                label,
                ctx.domain.rank,
                ctx.domain.size,
                gm.print_readable(print_output=False),
                ex.table,
                ex.summary,
            )
    except Exception as e:  # pragma: no cover - a report must never break compilation
        log.info("fxhalo could not describe the rewritten graph: %s: %s", type(e).__name__, e)
