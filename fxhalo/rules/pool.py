"""Max, average and adaptive pooling along the sharded dim (kernels in :mod:`fxhalo.ops.pool`).

Pooling never mixes planes, so a value sharded along the batch or channel dim
stays local.  Along a spatial dim the planner decides from the geometry:

* a pool whose every rank reads only its own rows, with windows that line up
  (kernel 1 and stride 1, or ``stride == kernel`` dividing the shard, no padding),
  is proven local and left as it is, unless it returns indices: those must be
  translated to the global input, which the kernel does (still with no exchange);
* any other window gets a halo exchange;
* adaptive pools always become the kernel, since their ``output_size`` along the
  sharded dim is the global length and each rank asks for its share of it.

Targets are spelled as Dynamo records them: ``F.max_pool2d`` is a
``boolean_dispatch`` wrapper whose ``return_indices=True`` variant is the separate
function ``F.max_pool2d_with_indices``; ``F.avg_pool2d`` is the builtin
``torch._C._nn.avg_pool2d``; ``torch.max_pool2d`` and friends are the builtins a
user may call directly.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..layout import Sharded, example_value, sharding_of
from ..ops import adaptive_pool as adaptive_ops
from ..ops import pool as pool_ops
from ..ops import reduce as reduce_ops
from ..ops.rows import ints, spatial_index
from . import Decision, KernelCall, bind, register
from .resample import Resampled, ResampleRule, domain_for, require_contiguous, resized, static_or_refuse


def _max_signature(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...


def _avg_signature(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
): ...


def _adaptive_signature(input, output_size, return_indices=False): ...


_MAX_KERNELS = {1: pool_ops.max_pool1d, 2: pool_ops.max_pool2d, 3: pool_ops.max_pool3d}
_AVG_KERNELS = {1: pool_ops.avg_pool1d, 2: pool_ops.avg_pool2d, 3: pool_ops.avg_pool3d}
_ADAPTIVE_KERNELS = {
    "avg": {
        1: adaptive_ops.adaptive_avg_pool1d,
        2: adaptive_ops.adaptive_avg_pool2d,
        3: adaptive_ops.adaptive_avg_pool3d,
    },
    "max": {
        1: adaptive_ops.adaptive_max_pool1d,
        2: adaptive_ops.adaptive_max_pool2d,
        3: adaptive_ops.adaptive_max_pool3d,
    },
}


def _sharded_spatial(node, ctx, args, nd: int, s: Sharded) -> int | None:
    """The pooled spatial dim that is sharded, or None when a batch or channel dim is."""
    sdim = spatial_index(example_value(args["input"]).ndim, nd, s.dim)
    if sdim is not None:
        require_contiguous(node, ctx, s)
    return sdim


class MaxPoolRule(ResampleRule):
    name = "pool"
    signature = inspect.signature(_max_signature)

    def __init__(self, nd: int, indices: bool | None):
        self.nd = nd
        self.indices = indices  # None: as the node's return_indices says

    def plan(self, node, ctx, args, s):
        nd = self.nd
        ret = bool(args["return_indices"]) if self.indices is None else self.indices
        items = 2 if ret else 0
        static_or_refuse(
            node,
            ctx,
            kernel_size=args["kernel_size"],
            stride=args["stride"],
            padding=args["padding"],
            dilation=args["dilation"],
        )
        sdim = _sharded_spatial(node, ctx, args, nd, s)
        if sdim is None:  # batch or channel sharded; indices count within each plane, so they hold
            return Resampled(s, items=items)
        stride = pool_ops.default_stride(args["stride"], args["kernel_size"])
        k, st = ints(args["kernel_size"], nd), ints(stride, nd)
        p, d = ints(args["padding"], nd), ints(args["dilation"], nd)
        plan = pool_ops.plan_pool(
            pool_ops.PoolDim(k[sdim], st[sdim], p[sdim], d[sdim], bool(args["ceil_mode"])),
            domain_for(ctx, s),
            s.global_length,
            float("-inf"),
            None,
            f"max_pool{nd}d (kernel {k}, stride {st}, padding {p}, dilation {d})",
        )
        out = resized(s, plan.m, ctx)
        if plan.local and not ret:
            return Resampled(out)
        call = (
            args["input"],
            args["kernel_size"],
            args["stride"],
            args["padding"],
            args["dilation"],
            args["ceil_mode"],
            ret,
        )
        return Resampled(out, _MAX_KERNELS[nd], call, items)


class AvgPoolRule(ResampleRule):
    name = "pool"
    signature = inspect.signature(_avg_signature)

    def __init__(self, nd: int):
        self.nd = nd

    def plan(self, node, ctx, args, s):
        nd = self.nd
        static_or_refuse(node, ctx, kernel_size=args["kernel_size"], stride=args["stride"], padding=args["padding"])
        sdim = _sharded_spatial(node, ctx, args, nd, s)
        if sdim is None:
            return Resampled(s)
        stride = pool_ops.default_stride(args["stride"], args["kernel_size"])
        k, st, p = ints(args["kernel_size"], nd), ints(stride, nd), ints(args["padding"], nd)
        plan = pool_ops.plan_pool(
            pool_ops.PoolDim(k[sdim], st[sdim], p[sdim], 1, bool(args["ceil_mode"])),
            domain_for(ctx, s),
            s.global_length,
            0.0,
            bool(args["count_include_pad"]),
            f"avg_pool{nd}d (kernel {k}, stride {st}, padding {p})",
        )
        out = resized(s, plan.m, ctx)
        if plan.local:
            return Resampled(out)
        call = (
            args["input"],
            args["kernel_size"],
            args["stride"],
            args["padding"],
            args["ceil_mode"],
            args["count_include_pad"],
        ) + (() if nd == 1 else (args["divisor_override"],))
        return Resampled(out, _AVG_KERNELS[nd], call)


class AdaptivePoolRule(ResampleRule):
    """Adaptive pooling: a window along the sharded dim, or, to output size 1 there, a reduction.

    Pooling to one row along the sharded dim (value-only spellings) is a reduction over
    the ranks: one collective (:func:`fxhalo.ops.reduce.adaptive_avg_pool` /
    ``adaptive_max_pool``), replicated output.  Every other case is windowed.
    """

    name = "pool"
    signature = inspect.signature(_adaptive_signature)

    def __init__(self, nd: int, kind: str, indices: bool | None):
        self.nd, self.kind, self.indices = nd, kind, indices

    def decide(self, node, ctx) -> Decision:
        a = bind(self.signature, node)
        s = sharding_of(a["input"])
        if s is None or self.indices or not self._to_one(a, s):
            return super().decide(node, ctx)
        if self.kind == "max" and not s.contiguous:
            ctx.refuse(
                node,
                f"max-pools a dim whose shards are interleaved with another dim ({s})",
                "pool before the reshape that merged the sharded dim under another dim",
            )
        return Decision(None, self._to_one_call, s)

    def combined_call(self, node, calls):
        """On a mesh whose axes decided differently (one dim pooled to one value, a reduction; another to
        windows): the call of the kernel that pools dim by dim over all of them
        (:func:`fxhalo.ops.adaptive_pool.adaptive_pool_dim_by_dim`); ``None`` for indices.  (``calls``,
        each axis's own kernel call, are not needed.)"""
        a = bind(self.signature, node)
        if self.indices or a["return_indices"]:
            return None

        def call(node) -> KernelCall:
            args = bind(self.signature, node)
            kwargs = {"nd": self.nd, "kind": self.kind}
            return KernelCall(adaptive_ops.adaptive_pool_dim_by_dim, (args["input"], args["output_size"]), kwargs)

        return call

    def _to_one(self, a, s: Sharded) -> bool:
        sdim = s.dim - (example_value(a["input"]).ndim - self.nd)
        sizes = a["output_size"]
        sizes = tuple(sizes) if isinstance(sizes, (list, tuple)) else (sizes,) * self.nd
        return sdim >= 0 and isinstance(sizes[sdim], int) and sizes[sdim] == 1 and not a["return_indices"]

    def _to_one_call(self, node) -> KernelCall:
        a = bind(self.signature, node)
        kernel = reduce_ops.adaptive_max_pool if self.kind == "max" else reduce_ops.adaptive_avg_pool
        return KernelCall(kernel, (a["input"], a["output_size"]), {"nd": self.nd})

    def plan(self, node, ctx, args, s):
        nd, kind = self.nd, self.kind
        ret = kind == "max" and (bool(args["return_indices"]) if self.indices is None else self.indices)
        items = 2 if ret else 0
        static_or_refuse(node, ctx, output_size=args["output_size"])
        sdim = _sharded_spatial(node, ctx, args, nd, s)
        if sdim is None:
            return Resampled(s, items=items)
        size = args["output_size"]
        sizes = list(size) if isinstance(size, (tuple, list)) else [size] * nd
        m = s.global_length if sizes[sdim] is None else int(sizes[sdim])
        plan = adaptive_ops.plan_adaptive(
            domain_for(ctx, s), s.global_length, m, f"adaptive_{kind}_pool{nd}d (output size {tuple(sizes)})"
        )
        out = resized(s, m, ctx)
        if plan.halo is None and sizes[sdim] is None and not ret:
            return Resampled(out)  # keeps the (local) size along the sharded dim: local as it is
        call = (args["input"], size) + ((ret,) if kind == "max" else ())
        return Resampled(out, _ADAPTIVE_KERNELS[kind][nd], call, items)


for _nd in (1, 2, 3):
    register(MaxPoolRule(_nd, None), getattr(F, f"max_pool{_nd}d"), getattr(torch, f"max_pool{_nd}d", None))
    register(
        MaxPoolRule(_nd, True),
        getattr(F, f"max_pool{_nd}d_with_indices"),
        getattr(torch, f"max_pool{_nd}d_with_indices", None),
        getattr(torch._C._nn, f"max_pool{_nd}d_with_indices", None),
    )
    register(
        AvgPoolRule(_nd),
        getattr(F, f"avg_pool{_nd}d"),
        getattr(torch, f"avg_pool{_nd}d", None),
        getattr(torch._C._nn, f"avg_pool{_nd}d", None),
    )
    register(
        AdaptivePoolRule(_nd, "avg", None),
        getattr(F, f"adaptive_avg_pool{_nd}d"),
        getattr(torch, f"adaptive_avg_pool{_nd}d", None),
        getattr(torch._C._nn, f"adaptive_avg_pool{_nd}d", None),
    )
    register(AdaptivePoolRule(_nd, "max", None), getattr(F, f"adaptive_max_pool{_nd}d"))
    register(
        AdaptivePoolRule(_nd, "max", True),
        getattr(F, f"adaptive_max_pool{_nd}d_with_indices"),
        getattr(torch, f"adaptive_max_pool{_nd}d", None),
        getattr(torch._C._nn, f"adaptive_max_pool{_nd}d", None),
    )

# max_pool(..., return_indices=True) returns (values, indices), read with operator.getitem.
