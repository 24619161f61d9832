"""Scans (``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin``): local along another dim.

Along the sharded dim, each becomes its kernel in :mod:`fxhalo.ops.scan` (the local
scan plus one all_gather of every rank's total); the output (both outputs of
``cummax``/``cummin``, whose indices are global row numbers) is sharded like the
input.  Along any other dim every scan is local.
"""

from __future__ import annotations

import inspect

from ..layout import example_value, sharding_of
from ..ops import scan as ops
from . import Decision, KernelCall, Rule, bind, register_op
from .resample import require_contiguous


def _scan_signature(input, dim, dtype=None): ...


def _scan_no_dtype_signature(input, dim): ...


class Scan(Rule):
    name = "scan"

    def __init__(self, kernel, pair: bool = False, dtype: bool = True):
        self._kernel = kernel
        self._pair = pair  # returns (values, indices)
        self._sig = inspect.signature(_scan_signature if dtype else _scan_no_dtype_signature)

    def decide(self, node, ctx) -> Decision:
        a = bind(self._sig, node)
        s = sharding_of(a["input"])
        if s is None:
            return Decision()
        along = int(a["dim"]) % example_value(a["input"]).ndim == s.dim
        out = (s, s) if self._pair else s
        if not along:
            return Decision(out)
        require_contiguous(node, ctx, s)
        return Decision(out, self.kernel_call, s)

    def kernel_call(self, node) -> KernelCall:
        a = bind(self._sig, node)
        kwargs = {"dtype": a["dtype"]} if "dtype" in a else {}
        return KernelCall(self._kernel, (a["input"], a["dim"]), kwargs)


register_op(Scan(ops.cumsum), "cumsum")
register_op(Scan(ops.cumprod), "cumprod")
register_op(Scan(ops.logcumsumexp, dtype=False), "logcumsumexp")
register_op(Scan(ops.cummax, pair=True, dtype=False), "cummax")
register_op(Scan(ops.cummin, pair=True, dtype=False), "cummin")
