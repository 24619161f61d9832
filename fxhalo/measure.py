"""Rows from a rewritten graph: run it once on fake tensors and record what its kernels communicate.

Used by :func:`fxhalo.explain` and by the backend's log (:mod:`fxhalo.log`).  A
torch-function mode records each functional collective the kernels issue, per
graph node; a halo observer (:func:`fxhalo.halo.observe_halos`) records the plan
and the edge of each halo exchange.  Functional collectives on fake tensors only
compute metadata, so measuring is safe inside a real process group too.
"""

from __future__ import annotations

import collections
import math
import operator
import os
import re

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .domain import each_axis, resolve_group
from .errors import _public_name, user_source
from .halo import Edge, observe_halos
from .layout import Items, Layout, Sharded, layout_of
from .ops import grad as _grad_ops
from .redistribute import observe_moves
from .report import Collective, Row

__all__ = ["ORIGIN", "measure_rows", "local_nodes", "problem_row", "sharding_dim", "spelled", "is_call", "where"]

ORIGIN = "fxhalo_explain_origin"  # (node name, op) before the rewrite; the rewrite copies meta over

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
_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")


def problem_row(index: int, node: str, op: str, source: str, error: BaseException, dim=None) -> Row:
    return Row(index, node, op, "", source, dim, error=str(error) or type(error).__name__)


def _entries(arg) -> list:
    """Every mesh axis's entry of ``arg``'s layout (an item's too, for a tuple-valued node)."""
    layout = layout_of(arg)
    layouts = list(layout) if isinstance(layout, Items) else [layout]
    return [e for lay in layouts if isinstance(lay, Layout) for e in lay.axes if e is not None]


def sharding_dim(node) -> int | tuple[int, ...] | None:
    """The sharded dim of the node or of its first sharded input; on several mesh axes, one per axis."""
    for a in (node, *node.all_input_nodes):
        dims = tuple(e.dim for e in _entries(a) if isinstance(e, Sharded))
        if dims:
            return dims[0] if len(dims) == 1 else dims
    return None


# -- rows from a rewritten graph ------------------------------------------------------


def is_call(node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def _is_kernel(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__module__", "").startswith("fxhalo.")


def spelled(node) -> str:
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
    if ORIGIN in node.meta:
        return node.meta[ORIGIN]
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


def where(node) -> str:
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


def edge_name(edge) -> str:
    """The edge column: what the kernel told the halo observer fills the rows past the global edges."""
    if isinstance(edge, Edge):
        return f"constant {edge.value:g}" if edge.mode == "constant" else edge.mode
    return edge or ""


def local_nodes(graph, skip=()) -> collections.Counter:
    """Ops that read or produce a sharded value and run on the slab unchanged."""
    local: collections.Counter = collections.Counter()
    for n in graph.graph.nodes:
        if not is_call(n) or _is_kernel(n) or n.name in skip:
            continue
        if n.target is operator.getitem and _is_kernel(n.args[0]):
            continue  # one output of a kernel that returns several
        if _entries(n) or any(_entries(a) for a in n.all_input_nodes):
            local[_origin(n)[1] if ORIGIN in n.meta else spelled(n)] += 1
    return local


def _dims_of(node):
    """The sharded dim a kernel was told (``axes=``), a tuple of them on several mesh axes, or the layout's."""
    if "axes" not in node.kwargs:
        return sharding_dim(node)
    dims = tuple(a.dim for a in each_axis(node.kwargs["axes"]))
    return dims[0] if len(dims) == 1 else dims


def measure_rows(graph, index: int, grad: bool, size: int, axis_labels=None) -> list[Row]:
    """One row per kernel of ``graph``.  ``axis_labels`` (group name -> label; on a mesh of several
    axes, :meth:`fxhalo.mesh.MeshDomain.labels`) marks each collective with the axis it runs along."""
    seen = _measure(graph, grad, size, axis_labels or {})
    rows = []
    for n in graph.graph.nodes:
        if not _is_kernel(n):
            continue
        name, op = _origin(n)
        calls = tuple(seen.calls.get(n.name, ()))
        exchanges = seen.halos.get(n.name, ())
        halos = tuple((plan.lo, plan.hi) for plan, _ in exchanges)
        backward = [c.backward() for c in calls] + seen.backward_only.get(n.name, [])
        rows.append(
            Row(
                index,
                name,
                op,
                _kernel_name(n.target),
                where(n),
                _dims_of(n),
                halos,
                edge_name(exchanges[0][1]) if exchanges else "",
                calls,
                tuple(b for b in backward if b is not None),
                minimum=seen.minimums.get(n.name),
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
    """Records, per graph node, each functional collective and each halo exchange its kernel makes.

    A torch-function mode sees the calls above autograd, where ``requires_grad`` still
    tells whether the backward will run the collective.  The halo exchanges arrive as
    ``(plan, edge)`` through :meth:`halo`, the observer :func:`_measure` registers with
    :func:`fxhalo.halo.observe_halos`.
    """

    def __init__(self, size: int, axis_labels: dict[str, str]):
        super().__init__()
        self.size = size  # the domain's, for collectives whose arguments do not say
        self.axis_labels = axis_labels
        self.node: str | None = None
        self.calls: dict[str, list[Collective]] = collections.defaultdict(list)
        self.halos: dict[str, list] = collections.defaultdict(list)
        self.backward_only: dict[str, list[Collective]] = collections.defaultdict(list)
        self.minimums: dict[str, int] = {}

    def move(self, minimum: int) -> None:
        self.minimums[self.node] = self.minimums.get(self.node, 0) + minimum

    def halo(self, plan, edge) -> None:
        self.halos[self.node].append((plan, edge))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _collective_kind(func)
        if kind is not None:
            self._collective(kind, args, kwargs)
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
        self.calls[self.node].append(Collective(kind, sent, received, needs_grad, size, self.axis_of(args, kwargs)))

    def axis_of(self, args, kwargs) -> str:
        """The label of the group a collective names (its last text argument: the group's name)."""
        names = [a for a in (*args, *kwargs.values()) if isinstance(a, str)]
        return self.axis_labels.get(names[-1], "") if names else ""


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
                axis = self.watch.axis_of((), kwargs)
                self.watch.backward_only[n.name].append(
                    Collective("all_reduce", nbytes, nbytes, False, self.watch.size, axis)
                )
        return super().run_node(n)


def _measure(graph: torch.fx.GraphModule, grad: bool, size: int, axis_labels: dict[str, str]) -> _Watch:
    """Run ``graph`` once on its fake example values, recording what the kernels communicate.

    Functional collectives on fake tensors only compute metadata, so this is safe
    inside a real process group too.
    """
    watch = _Watch(size, axis_labels)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    modes = [a.fake_mode for a in fakes if isinstance(a, FakeTensor)]
    if not modes:
        return watch
    with modes[0], torch.set_grad_enabled(grad), watch, observe_halos(watch.halo), observe_moves(watch.move):
        fakes = [_with_grad(n, f) for n, f in zip(placeholders, fakes)]
        _Measure(graph, watch).run(*fakes)
    return watch


def _with_grad(node, fake):
    """``fake``, requiring grad when the real input does.

    The meta refresh stores detached values (``FakeTensorProp`` snapshots them), so
    the placeholders' fakes no longer say which inputs require grad; Dynamo's
    ``grapharg`` still knows.
    """
    if not isinstance(fake, torch.Tensor) or fake.requires_grad or not (fake.is_floating_point() or fake.is_complex()):
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
