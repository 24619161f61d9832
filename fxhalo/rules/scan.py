"""Scans (``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin``): local along another dim.

Along the sharded dim, ``cumsum``, ``cumprod`` and ``logcumsumexp`` become the
kernels of :mod:`fxhalo.ops.scan` (the local scan plus one all_gather of every
rank's total); the output is sharded like the input.  ``cummax``/``cummin`` along
the sharded dim are refused: their indices' ties would have to follow torch's choice
across ranks.  Along any other dim every scan is local.
"""

from __future__ import annotations

import inspect

from ..layout import example_value, sharding_of
from ..ops import scan as ops
from . import Decision, KernelCall, Rule, bind, register_op
from .resample import require_contiguous


def _scan_signature(input, dim, dtype=None): ...


def _scan_pair_signature(input, dim): ...


class Scan(Rule):
    name = "scan"

    def __init__(self, kernel, pair: bool = False):
        self._kernel = kernel  # None: refused along the sharded dim
        self._pair = pair  # returns (values, indices)
        self._sig = inspect.signature(_scan_pair_signature if pair else _scan_signature)

    def decide(self, node, ctx) -> Decision:
        a = bind(self._sig, node)
        s = sharding_of(a["input"])
        if s is None:
            return Decision()
        along = int(a["dim"]) % example_value(a["input"]).ndim == s.dim
        out = (s, s) if self._pair else s
        if not along:
            return Decision(out)
        if self._kernel is None:
            ctx.refuse(
                node,
                f"returns the indices of a running extreme along the sharded dim {s.dim}",
                "scan along another dim, or run it on fxhalo.gather()ed values",
            )
        require_contiguous(node, ctx, s)
        return Decision(out, self.kernel_call, s)

    def kernel_call(self, node) -> KernelCall:
        a = bind(self._sig, node)
        kwargs = {} if self._kernel is ops.logcumsumexp else {"dtype": a["dtype"]}
        return KernelCall(self._kernel, (a["input"], a["dim"]), kwargs)


register_op(Scan(ops.cumsum), "cumsum")
register_op(Scan(ops.cumprod), "cumprod")
register_op(Scan(ops.logcumsumexp), "logcumsumexp")
register_op(Scan(None, pair=True), "cummax", "cummin")
