"""The rule contract and the registry: graph target -> rule.

A **rule** is a callable ``rule(node, ctx) -> Decision`` for a node whose inputs'
layouts are known (:func:`~fxhalo.layout.sharding_of` each input).  It looks at the node and
returns one :class:`Decision`:

* ``out``: how the node's value is laid out (a :class:`~fxhalo.layout.Sharded`,
  ``None`` for replicated, or a tuple of these for a tuple-valued node);
* ``call``: when the node must change, a function that builds its replacement, a
  :class:`KernelCall`, from the node's *current* arguments.  The rewrite pass calls
  it, after earlier rewrites may have replaced the node's input nodes, so a rule
  never holds on to node references from propagation time.  ``None``: the node is
  proven local and stays as it is;
* ``layout``: the layout of the sharded input the kernel works on; the rewrite
  passes it to the kernel as ``axes=`` (:class:`~fxhalo.domain.ShardAxis`: the dim,
  the group, the global length);
* ``plan``: what the rule planned (a conv's window plan), for fusions and reports.

A rule refuses a node by raising :class:`~fxhalo.errors.FxHaloError` (through
``ctx.refuse``).  It never changes the graph.  The propagation pass stores the
decision under ``node.meta[DECISION]``; :func:`replace_node` is the one function
that swaps a node for a kernel call.

Targets without a rule are refused whenever they read a sharded value (see
:mod:`fxhalo.passes.propagate`).  Each module of this package is an op family that
registers its rules when imported; :func:`all_rules` imports every module here, so a
new family is a new file and nothing else.  A target registered twice is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "DECISION",
    "Decision",
    "KernelCall",
    "LayoutRule",
    "OnAxes",
    "Rule",
    "all_rules",
    "bind",
    "decided_on_mesh",
    "decision_of",
    "lookup",
    "register",
    "register_op",
    "replace_node",
    "spellings",
]

#: node.meta key: the :class:`Decision` the propagation pass took for the node
DECISION = "fxhalo_decision"


def bind(sig: inspect.Signature, node) -> dict:
    """The node's arguments by parameter name, defaults filled in.

    Each rule binds its nodes against one explicit Python signature, so it sees the
    same names whatever the spelling (``normalize_function`` is ambiguous for ops
    with several overloads, such as ``torch.conv2d``).
    """
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """The call that replaces a node: ``kernel(*args, **kwargs)``, plus ``axes=`` from its layout."""

    kernel: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a rule decided for one node (see the module docstring)."""

    out: object = None
    call: Callable[[torch.fx.Node], KernelCall] | None = None
    layout: object = None
    plan: object = None
    #: the rule that decided (filled in by the propagation pass)
    rule: object = None

    @property
    def rewrites(self) -> bool:
        return self.call is not None


def decision_of(node) -> Decision | None:
    """The decision recorded for ``node`` (``None`` for inputs, outputs and refused nodes)."""
    meta = getattr(node, "meta", None)
    return meta.get(DECISION) if meta is not None else None


class Rule:
    """Base class of the rule objects: subclasses implement :meth:`decide`; calling a rule decides."""

    #: a short name for reports ("local", "conv", ...)
    name = "rule"

    def decide(self, node, ctx) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, node, ctx) -> Decision:
        return self.decide(node, ctx)


class LayoutRule(Rule):
    """A rule for ops that never change the graph: subclasses give the output layout only."""

    def layout(self, node, ctx):  # pragma: no cover - interface
        raise NotImplementedError

    def decide(self, node, ctx) -> Decision:
        return Decision(self.layout(node, ctx))


@dataclasses.dataclass(frozen=True)
class OnAxes:
    """A :attr:`Decision.layout` on a mesh of several axes: for each axis the kernel communicates
    along, in mesh-axis order, ``(that axis's Domain, the Sharded entry of its input)``; ``plans``: each
    axis's :attr:`Decision.plan`, in the same order (what :func:`fxhalo.validate` reads per axis)."""

    entries: tuple
    plans: tuple = ()


def decided_on_mesh(ctx, layout, axes, targets, call, plan) -> Decision:
    """The decision of a rule that plans over every mesh axis at once (``decide_on_mesh``): ``axes`` are
    ``(mesh axis, input entry)`` of every axis that splits the input (the kernel gets them all, in that
    order); an axis with a target ``(dim, global length)`` ends there, balanced, the others stay."""
    from ..layout import Layout, split

    out = list(layout.axes)
    for (axis, _), target in zip(axes, targets):
        if target is not None:
            out[axis] = split(*target, ctx.mesh.axes[axis])
    entries = tuple((ctx.mesh.axes[axis], s) for axis, s in axes)
    return Decision(Layout(tuple(out)), call, OnAxes(entries, (plan,) * len(entries)), plan)


def replace_node(node, call: KernelCall, ctx, layout=None):
    """Replace ``node`` by ``call``; with a ``layout``, tell the kernel where its input is sharded (``axes=``):
    a :class:`~fxhalo.layout.Sharded` on the domain's one axis, or an :class:`OnAxes`.

    The new node takes over the old one's meta (its layout, decision, source line)
    and every use; the old node is erased.  Returns the new node.
    """
    graph = node.graph
    kwargs = dict(call.kwargs)
    if isinstance(layout, OnAxes):
        kwargs["axes"] = tuple(d.kernel_axes(s.dim, s.global_length)[0] for d, s in layout.entries)
    elif layout is not None:
        kwargs["axes"] = ctx.domain.kernel_axes(layout.dim, layout.global_length)
    with graph.inserting_before(node):
        new = graph.call_function(call.kernel, tuple(call.args), kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


_RULES: dict[tuple[str, object], Rule] = {}


def register(rule, *targets, op: str = "call_function"):
    """Register ``rule`` for each of ``targets`` (functions, or method names with ``op='call_method'``).

    ``None`` targets (a spelling absent from this torch build) are skipped.  Registering
    a target that already has a rule raises: one rule per target, whatever the import order.
    """
    for target in targets:
        if target is None:
            continue
        key = (op, target)
        if key in _RULES and _RULES[key] is not rule:
            raise RuntimeError(f"fxhalo: two rules for {op} {getattr(target, '__name__', target)!r}")
        _RULES[key] = rule
    return rule


#: where Dynamo finds the functions of an op called by name
_NAMESPACES = (torch, F, torch._C._nn, torch.special)


def spellings(name: str, *, inplace: bool = False) -> list[tuple[str, object]]:
    """Every ``(op, target)`` a Dynamo graph may hold for the op ``name``.

    ``torch.X``, ``F.X``, ``torch._C._nn.X`` and ``torch.special.X`` when they exist, and
    the method ``Tensor.X``; with ``inplace``, the same for ``X_``.
    """
    found: list[tuple[str, object]] = []
    for spelled in (name, name + "_") if inplace else (name,):
        for ns in _NAMESPACES:
            fn = getattr(ns, spelled, None)
            if callable(fn) and ("call_function", fn) not in found:
                found.append(("call_function", fn))
        if hasattr(torch.Tensor, spelled):
            found.append(("call_method", spelled))
    return found


def register_op(rule, *names: str, inplace: bool = False):
    """Register ``rule`` under every spelling (:func:`spellings`) of each op in ``names``."""
    for name in names:
        for op, target in spellings(name, inplace=inplace):
            register(rule, target, op=op)
    return rule


def lookup(node):
    try:
        return _RULES.get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


def all_rules() -> dict[tuple[str, object], Rule]:
    _load()
    return dict(_RULES)


def _load() -> None:
    """Import every op family in this package; each registers its own rules."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load()
