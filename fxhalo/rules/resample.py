"""What the resampling rules (pooling, transposed conv, interpolation) share, and tuple items.

Each resampling rule binds its node to one signature, checks that only the input is
sharded, and asks its kernel module's planner (the same planner the kernel runs) for
a :class:`Resampled`: the output's layout, and the kernel call that replaces the node,
or none when the geometry proves the op local and the node can stay as it is.  A
planner's :class:`~fxhalo.ops.rows.Unsplittable` becomes a refusal naming the node.

``max_pool(..., return_indices=True)`` returns a tuple, which the graph reads with
``operator.getitem``.  Such a node's layout is the tuple of its items' layouts
(values and indices are laid out alike); the getitem rule of
:mod:`fxhalo.rules.shape` hands each item its layout.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch

from .. import layout
from ..domain import Domain
from ..geometry import Unsplittable
from ..layout import Sharded, sharding_of
from . import Decision, KernelCall, Rule, bind

__all__ = ["Resampled", "ResampleRule", "domain_for", "require_contiguous", "resized", "static_or_refuse"]


@dataclasses.dataclass(frozen=True)
class Resampled:
    """A resampling rule's plan: ``out``, the output layout; ``kernel`` and ``args``, the replacement
    call (``kernel=None``: the node is local as it is)."""

    out: Sharded | None
    kernel: Callable | None = None
    args: tuple = ()
    items: int = 0  # how many tuple items the node returns (0: a single tensor)


class ResampleRule(Rule):
    """Skeleton of the resampling rules; subclasses give ``signature`` and :meth:`plan`."""

    signature: inspect.Signature
    #: parameters that must be replicated
    replicated: tuple[str, ...] = ()

    def plan(self, node, ctx, args: dict, s: Sharded) -> Resampled:  # pragma: no cover - interface
        raise NotImplementedError

    def decide(self, node, ctx) -> Decision:
        args = bind(self.signature, node)
        s = sharding_of(args["input"])
        for name in self.replicated:
            if sharding_of(args.get(name)) is not None:
                ctx.refuse(node, f"takes a sharded tensor as its {name}", f"pass a replicated {name}")
        if s is None:
            return Decision()
        try:
            planned = self.plan(node, ctx, args, s)
        except Unsplittable as e:
            ctx.refuse(node, e.problem, e.remedy)
        out = (planned.out,) * planned.items if planned.items else planned.out
        if planned.kernel is None:
            return Decision(out)
        return Decision(out, self._builder(planned, args), s)

    def _builder(self, planned: Resampled, planned_from: dict):
        """The call of ``planned``, with the node's *current* arguments in place of those it was planned from
        (an earlier rewrite may have replaced an input node); the plan itself is not made again."""

        def build(node) -> KernelCall:
            now = bind(self.signature, node)
            current = {v: now[k] for k, v in planned_from.items() if isinstance(v, torch.fx.Node)}
            return KernelCall(planned.kernel, torch.fx.node.map_arg(planned.args, lambda n: current.get(n, n)))

        return build


def domain_for(ctx, s: Sharded) -> Domain:
    """The rule-time domain of a value sharded along ``s.dim`` (what the kernel will build at run time)."""
    return Domain(ctx.domain.group_name, ctx.domain.rank, ctx.domain.size, s.dim)


def resized(s: Sharded, m: int, ctx) -> Sharded:
    """The layout of an op's output of ``m`` global rows along ``s.dim`` (:func:`fxhalo.layout.resized`)."""
    return layout.resized(s, m, ctx.domain)


def require_contiguous(node, ctx, s: Sharded) -> None:
    """Windowed ops need each rank's rows as one block (not interleaved by a reshape)."""
    if getattr(s, "outer", 1) != 1:
        ctx.refuse(
            node,
            f"resamples along a dim whose shards are interleaved with another dim ({s})",
            "apply the op before the reshape that merged the sharded dim under another dim",
        )


def static_or_refuse(node, ctx, **values):
    """Refuse when an argument the plan needs (a size, a scale) is only known at run time."""
    for name, value in values.items():
        items = value if isinstance(value, (tuple, list)) else [value]
        if any(hasattr(v, "op") and hasattr(v, "meta") for v in items):
            ctx.refuse(
                node,
                f"takes its {name} from a value computed at run time",
                f"pass {name} as Python numbers, so that the halo can be planned when compiling",
            )
