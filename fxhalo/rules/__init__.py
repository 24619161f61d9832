"""The registry: graph target -> rule.

A rule answers two questions about a node whose inputs' shardings are known:

* ``propagate(node, ctx)``: how is the output laid out (a :class:`~fxhalo.sharding.Sharded`
  or ``None``)?  It raises :class:`~fxhalo.errors.FxHaloError` when the op cannot be
  made domain-parallel.  It must not change the graph.
* ``rewrite(node, ctx)``: replace the node with its domain-parallel form; return
  whether anything changed.  Rules for ops that are local return ``False``.

Targets without a rule are refused whenever they read a sharded value (see
:mod:`fxhalo.passes.sharding`).  Adding an op means adding a rule module here and
its test; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

__all__ = [
    "Rule",
    "PlannedRule",
    "KernelCall",
    "KERNEL_INPUT",
    "replace_with_kernel",
    "bind",
    "register",
    "lookup",
    "all_rules",
]

#: node.meta key: the layout of the input of a node that becomes a kernel call (absent or None: left as is)
KERNEL_INPUT = "fxhalo_kernel_input"


def bind(sig: inspect.Signature, node) -> dict:
    """The node's arguments by parameter name, defaults filled in.

    Each rule binds its nodes against one explicit Python signature, so it sees the
    same names whatever the spelling (``normalize_function`` is ambiguous for ops
    with several overloads, such as ``torch.conv2d``).
    """
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class Rule:
    """Base class; subclasses override :meth:`propagate` and, when needed, :meth:`rewrite`."""

    #: a short name for reports ("local", "conv", ...)
    name = "rule"

    def propagate(self, node, ctx):  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, node, ctx) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """The call that replaces a node: ``kernel(*args, **kwargs, shard_dim=, group_name=, length=)``."""

    kernel: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)


def replace_with_kernel(node, call: KernelCall, ctx, s) -> None:
    """Replace ``node`` by ``call``, told where its input ``s`` is sharded and its global length."""
    graph = node.graph
    kwargs = dict(call.kwargs, shard_dim=s.dim, group_name=ctx.domain.group_name, length=s.length)
    with graph.inserting_before(node):
        new = graph.call_function(call.kernel, call.args, kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


class PlannedRule(Rule):
    """A rule that decides in ``propagate``: ``node.meta[KERNEL_INPUT]`` is the input's layout when
    the node becomes a kernel call, else ``None``.

    The call itself is built from the node's arguments when the rewrite runs
    (:meth:`kernel_call`): an earlier rewrite may have replaced an input node, and
    only the node's own arguments are updated when that happens.
    """

    def kernel_call(self, node) -> KernelCall:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, node, ctx) -> bool:
        s = node.meta.get(KERNEL_INPUT)
        if s is None:
            return False
        replace_with_kernel(node, self.kernel_call(node), ctx, s)
        return True


_RULES: dict[tuple[str, object], Rule] = {}


def register(rule: Rule, *targets, op: str = "call_function") -> Rule:
    """Register ``rule`` for each of ``targets`` (functions, or method names with ``op='call_method'``)."""
    for target in targets:
        if target is None:
            continue  # an optional spelling absent from this torch build
        _RULES[(op, target)] = rule
    return rule


def lookup(node) -> Rule | None:
    try:
        return _RULES.get((node.op, node.target))
    except TypeError:  # unhashable target
        return None


def all_rules() -> dict[tuple[str, object], Rule]:
    _load()
    return dict(_RULES)


def _load() -> None:
    """Import the rule families (each registers itself)."""
    from . import conv, conv_transpose, interpolate, local, loss, norm, pool, reduce, resample, shape, shift  # noqa: F401


_load()
