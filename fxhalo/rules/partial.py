"""Ops that keep a partial sum partial: those linear in it, so that a chain of them costs one sum.

A product that contracts the sharded dim leaves every rank a summand of its value
(:class:`~fxhalo.layout.Partial`).  Summing it at once would be exact, but a chain
of linear ops (``x @ w1 @ w2``, an einsum followed by a reshape and a mean, a
Legendre-type transform and its scaling) would then pay one sum per product.  An
op ``f`` with ``f(a + b) = f(a) + f(b)`` can run on each summand instead, and the
pass sums once, after the chain, where the value is first needed whole (an
all-reduce) or sharded again (a reduce-scatter, :mod:`fxhalo.passes.localize`).

Linear in a partial operand ``p`` (every other tensor operand replicated):

* shape ops (the ops whose rule is a shape rule: views, reshapes, permutes,
  squeezes, expands, ``narrow``/``select``, indexing), ``t``, ``clone``, ``contiguous``;
* ``neg``; ``sum`` and ``mean`` over any dims;
* ``p * r`` and ``r * p`` (``r`` replicated or a number); ``p / r``;
* ``p + q`` and ``p - q`` with *both* partial (``p + r`` is not linear: ``r`` would
  be added once per rank);
* products with one partial operand: ``matmul``, ``bmm``, ``einsum``, and ``linear``
  without a bias.

An op linear in it whose output is *larger* than its partial input (an ``expand``, a
product that maps a few coefficients back to the grid, a broadcast ``mul``) does not
keep it either: the sum is cheapest on the smaller tensor, so it happens before.

Everything else is not linear (or not known to be), and the propagation sums the
partial input first (:func:`fxhalo.passes.propagate.sum_partials`).  Casts are left
out on purpose: a rounding per summand differs from a rounding of the sum.
"""

from __future__ import annotations

import math
import operator

import torch

from ..layout import PARTIAL, Layout, Partial, example_value, is_tensor_node, layout_of, sharding_of
from . import Decision, Rule, lookup, spellings
from .shape import Expand, GetItem, Narrow, Permute, Reshape, Squeeze, Unsqueeze

__all__ = ["KEEPS_PARTIAL", "keeps_partial", "is_partial"]

_SHAPE_RULES = (Reshape, Permute, Unsqueeze, Squeeze, Expand, Narrow, GetItem)


def _targets(*names: str, extra=()) -> frozenset:
    return frozenset([*(key for name in names for key in spellings(name)), *(("call_function", f) for f in extra)])


_UNARY = _targets("neg", "sum", "mean", "clone", "contiguous", "t", extra=(operator.neg,))
_SCALED = _targets("mul", extra=(operator.mul, operator.imul))
_DIVIDED = _targets("div", "true_divide", extra=(operator.truediv, operator.itruediv))
_ADDED = _targets("add", "sub", extra=(operator.add, operator.sub, operator.iadd, operator.isub))
_PRODUCTS = _targets("matmul", "bmm", "einsum", extra=(operator.matmul,))
_LINEAR = _targets("linear")


def is_partial(arg) -> bool:
    """A partial sum along some mesh axis (the one of :func:`~fxhalo.layout.axis_view`, inside one)."""
    layout = layout_of(arg)
    if not isinstance(layout, Layout):
        return False
    return any(isinstance(a, Partial) for a in layout.axes) if len(layout.axes) > 1 else layout.one_axis() is PARTIAL


def _numel(node) -> float:
    v = example_value(node)
    return v.numel() if isinstance(v, torch.Tensor) else math.inf


class KeepsPartial(Rule):
    """The decision for an op linear in its partial operand: the output is partial too, computed locally."""

    name = "partial"

    def decide(self, node, ctx) -> Decision:
        return Decision(PARTIAL)


KEEPS_PARTIAL = KeepsPartial()


def keeps_partial(node) -> bool:
    """True when ``node`` is linear in its partial operands (the module docstring's list)."""
    if node.op not in ("call_function", "call_method"):
        return False
    tensors = [a for a in node.all_input_nodes if is_tensor_node(a)]
    partial = [a for a in tensors if is_partial(a)]
    if not partial or any(sharding_of(a) is not None for a in tensors if a not in partial):
        return False  # a sharded operand: the partial one is summed (or scattered) to meet it
    key = (node.op, node.target)
    first = node.args[0] if node.args else None
    kw = node.kwargs
    if key in _ADDED:
        return len(node.args) >= 2 and all(is_partial(a) for a in node.args[:2])
    if any(_numel(node) > _numel(a) for a in partial):
        return False  # sum the smaller tensor
    if len(partial) != 1:
        return False  # a product of two partial sums is not one
    (p,) = partial
    if key in _SCALED:
        return True
    if key in _DIVIDED:
        return first is p and kw.get("rounding_mode") is None
    if key in _UNARY:
        return first is p and "dtype" not in kw
    if key in _PRODUCTS:
        return True
    if key in _LINEAR:
        bias = node.args[2] if len(node.args) > 2 else kw.get("bias")
        return first is p and bias is None
    return first is p and isinstance(lookup(node), _SHAPE_RULES)
