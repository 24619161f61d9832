"""Reductions and softmax: local, or one collective over the sharded dim.

A reduction whose dims leave out the sharded dim is local.  Its output is sharded
too, along the same dim moved left by the reduced dims before it (unless
``keepdim``).  A reduction over the sharded dim (or over everything) becomes a call
to a kernel in :mod:`fxhalo.ops.reduce` with one collective, and its result is
replicated (its decision's layout is ``None``).

Before::

    mean = l_x_.mean(dim=(2, 3))

After::

    mean = fxhalo.ops.reduce.mean(l_x_, (2, 3), False, dtype=None, axes=(ShardAxis(2, '0', 64),))

Spellings, as Dynamo records them: ``x.sum(...)`` is ``call_method 'sum'`` and
``torch.sum(x, ...)`` is ``call_function torch.sum``; the same holds for ``mean``,
``amax``, ``amin``, ``var``, ``std``, ``max``, ``min``, ``softmax`` and
``log_softmax``.  ``F.softmax`` and ``F.log_softmax`` arrive as the Python functions
themselves.  (Adaptive pooling to one row along the sharded dim is a reduction too;
its rule is the adaptive pooling rule of :mod:`fxhalo.rules.pool`.)
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

from ..layout import Sharded, example_value, is_tensor_node, sharding_of
from ..ops import reduce as ops
from . import Decision, KernelCall, Rule, bind, register, register_op
from .local import ELEMENTWISE


def after_reduction(s: Sharded, dims, keepdim: bool) -> Sharded:
    """Where the sharded dim lands after a reduction over ``dims`` that leaves it out."""
    if keepdim:
        return s
    return dataclasses.replace(s, dim=s.dim - sum(d < s.dim for d in dims))


# -- sum, mean, amax, amin, var, std -------------------------------------------


def _sum_signature(input, dim=None, keepdim=False, *, dtype=None, axis=None, out=None): ...
def _amax_signature(input, dim=(), keepdim=False, *, axis=None, out=None): ...
def _var_signature(input, dim=None, unbiased=None, keepdim=False, *, correction=None, axis=None, out=None): ...
def _max_signature(input, dim=None, keepdim=False, *, other=None, out=None): ...


_SUM_SIG = inspect.signature(_sum_signature)
_AMAX_SIG = inspect.signature(_amax_signature)
_VAR_SIG = inspect.signature(_var_signature)
_MAX_SIG = inspect.signature(_max_signature)


@dataclasses.dataclass(frozen=True)
class Reduced:
    """A reduction in canonical form: its input, the dims it reduces, ``keepdim``, and its kernel call."""

    input: object
    dims: tuple[int, ...]
    keepdim: bool
    call: KernelCall


def _dims(args, ndim):
    dim = args["axis"] if args.get("axis") is not None else args["dim"]
    return ops.reduced_dims(dim, ndim)


def _sum_like(kernel):
    def canonical(node) -> Reduced:
        a = bind(_SUM_SIG, node)
        dims = _dims(a, example_value(a["input"]).ndim)
        return Reduced(
            a["input"],
            dims,
            bool(a["keepdim"]),
            KernelCall(kernel, (a["input"], dims, bool(a["keepdim"])), {"dtype": a["dtype"]}),
        )

    return canonical


def _amax_like(kernel):
    def canonical(node) -> Reduced:
        a = bind(_AMAX_SIG, node)
        dims = _dims(a, example_value(a["input"]).ndim)
        return Reduced(
            a["input"], dims, bool(a["keepdim"]), KernelCall(kernel, (a["input"], dims, bool(a["keepdim"])), {})
        )

    return canonical


def _var_like(kernel):
    def canonical(node) -> Reduced:
        a = bind(_VAR_SIG, node)
        dim, unbiased = a["dim"], a["unbiased"]
        if isinstance(dim, bool):  # x.var(False): the legacy (unbiased) overload
            dim, unbiased = None, dim
        a["dim"] = dim
        dims = _dims(a, example_value(a["input"]).ndim)
        correction = a["correction"] if a["correction"] is not None else (0 if unbiased is False else 1)
        return Reduced(
            a["input"],
            dims,
            bool(a["keepdim"]),
            KernelCall(kernel, (a["input"], dims, correction, bool(a["keepdim"])), {}),
        )

    return canonical


def _refuse_out(node, ctx) -> None:
    if node.kwargs.get("out") is not None:
        ctx.refuse(node, "writes into an out= tensor", "assign the result instead of passing out=")


class Reduction(Rule):
    name = "reduce"

    def __init__(self, canonical):
        self._canonical = canonical  # node -> Reduced

    def decide(self, node, ctx) -> Decision:
        _refuse_out(node, ctx)
        return self._reduced(self._canonical(node))

    def kernel_call(self, node) -> KernelCall:
        return self._canonical(node).call

    def _reduced(self, r: Reduced) -> Decision:
        s = sharding_of(r.input)
        if s is None:
            return Decision()  # replicated: every rank computes the same value
        if s.dim not in r.dims:
            return Decision(after_reduction(s, r.dims, r.keepdim))
        return Decision(None, self.kernel_call, s)  # the result is replicated


class MaxMin(Reduction):
    """``torch.max``/``min`` and the methods: three ops under one name.

    * ``x.max()``: everything, like ``amax`` (one all_gather);
    * ``torch.max(x, y)``: elementwise, as ``torch.maximum``;
    * ``x.max(dim)``: values *and* indices.  Local when ``dim`` is not the sharded dim
      (a tuple of two layouts, one per output); refused along it.
    """

    def __init__(self, largest: bool):
        self._largest = largest
        self._kernel = ops.amax if largest else ops.amin

    def decide(self, node, ctx) -> Decision:
        _refuse_out(node, ctx)
        a = bind(_MAX_SIG, node)
        other = a["other"] if a["other"] is not None else a["dim"] if is_tensor_node(a["dim"]) else None
        if other is not None:
            return ELEMENTWISE.decide(node, ctx)
        ndim = example_value(a["input"]).ndim
        if a["dim"] is None:
            return self._reduced(self._everything(node))
        s = sharding_of(a["input"])
        dims = ops.reduced_dims(a["dim"], ndim)
        if s is None:
            return Decision()
        if s.dim in dims:
            which = "max" if self._largest else "min"
            ctx.refuse(
                node,
                f"returns the arg{which} indices along the sharded dim {s.dim}",
                f"use amax/amin (values only, supported along the sharded dim), or "
                f"torch.arg{which} on fxhalo.gather()ed values",
            )
        out = after_reduction(s, dims, bool(a["keepdim"]))
        return Decision((out, out))  # (values, indices), as getitem expects of a tuple-valued node

    def _everything(self, node) -> Reduced:
        x = bind(_MAX_SIG, node)["input"]
        dims = tuple(range(example_value(x).ndim))
        return Reduced(x, dims, False, KernelCall(self._kernel, (x, dims, False), {}))

    def kernel_call(self, node) -> KernelCall:
        return self._everything(node).call


_SUM = Reduction(_sum_like(ops.sum_))
_MEAN = Reduction(_sum_like(ops.mean))
_AMAX = Reduction(_amax_like(ops.amax))
_AMIN = Reduction(_amax_like(ops.amin))
_VAR = Reduction(_var_like(ops.var))
_STD = Reduction(_var_like(ops.std))
_MAX = MaxMin(True)
_MIN = MaxMin(False)

for _rule, _name in (
    (_SUM, "sum"),
    (_MEAN, "mean"),
    (_AMAX, "amax"),
    (_AMIN, "amin"),
    (_VAR, "var"),
    (_STD, "std"),
    (_MAX, "max"),
    (_MIN, "min"),
):
    register_op(_rule, _name)


# -- softmax ------------------------------------------------------------------


def _softmax_signature(input, dim, dtype=None): ...


_SOFTMAX_SIG = inspect.signature(_softmax_signature)
_F_SOFTMAX_SIG = inspect.signature(F.softmax)  # (input, dim=None, _stacklevel=3, dtype=None)


class Softmax(Rule):
    """Softmax and log-softmax: local along another dim; along the sharded dim, a global max and sum.

    The kernel sends each rank's (max, sum of exp) per row in one all_gather
    (:func:`fxhalo.ops.reduce.softmax`); the output is sharded like the input.
    """

    name = "softmax"

    def __init__(self, sig, kernel):
        self._sig = sig
        self._kernel = kernel

    def decide(self, node, ctx) -> Decision:
        a = bind(self._sig, node)
        s = sharding_of(a["input"])
        if s is None:
            return Decision()
        if self._dim(a) == s.dim:
            return Decision(s, self.kernel_call, s)
        return Decision(s)

    @staticmethod
    def _dim(a) -> int:
        ndim = example_value(a["input"]).ndim
        dim = a["dim"]
        if dim is None:  # torch's legacy implicit choice
            dim = 0 if ndim in (0, 1, 3) else 1
        return dim + ndim if dim < 0 else dim

    def kernel_call(self, node) -> KernelCall:
        a = bind(self._sig, node)
        return KernelCall(self._kernel, (a["input"], self._dim(a), a["dtype"]), {})


for _name, _kernel in (("softmax", ops.softmax), ("log_softmax", ops.log_softmax)):
    register(Softmax(_F_SOFTMAX_SIG, _kernel), getattr(F, _name))
    _plain = Softmax(_SOFTMAX_SIG, _kernel)
    register(_plain, getattr(torch, _name), getattr(torch.special, _name, None))
    register(_plain, _name, op="call_method")


# -- normalize ----------------------------------------------------------------


class Normalize(Rule):
    """``F.normalize(x, p, dim)``: each slice along ``dim`` divided by its norm.  Local along another dim
    (every rank holds whole slices); along the sharded dim it is refused (the norm would need a sum over
    the ranks that no kernel does yet)."""

    name = "normalize"

    def decide(self, node, ctx) -> Decision:
        a = bind(inspect.signature(F.normalize), node)
        s = sharding_of(a["input"])
        if s is None:
            return Decision()
        ndim = example_value(a["input"]).ndim
        dim = a["dim"] + ndim if a["dim"] < 0 else a["dim"]
        if dim == s.dim:
            ctx.refuse(
                node,
                f"normalizes along the sharded dim {dim}",
                "normalize along another dim, or use options={'fallback': 'gather'} for this op",
            )
        _refuse_out(node, ctx)
        return Decision(s)


register(Normalize(), F.normalize)
