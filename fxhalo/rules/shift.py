"""Padding, rolls, flips and pixel shuffles along the sharded dim.

* ``F.pad`` along the sharded dim becomes :func:`fxhalo.ops.shift.pad`; a pad of
  other dims only is local.  When the pad feeds exactly one conv, the fusion pass
  folds it into that conv's halo (:mod:`fxhalo.passes.fuse`).
* ``torch.roll`` along the sharded dim becomes :func:`fxhalo.ops.shift.roll`
  (a ring shift of exactly the rolled rows); ``torch.flip`` (and ``fliplr`` /
  ``flipud``) over it becomes :func:`fxhalo.ops.shift.flip`.  Along other dims
  both are local.  ``torch.roll`` without ``dims`` rolls the flattened tensor and
  is refused.
* ``pixel_shuffle`` / ``pixel_unshuffle`` map each rank's rows to a block of rows
  (or channels), so they are local exactly when the scaled shard boundaries are
  the output's shard boundaries under the partition rule; otherwise refused.
"""

from __future__ import annotations

import inspect

from ..domain import Partitioned
from ..errors import FxHaloError
from ..geometry import Unsplittable
from ..layout import Sharded, example_value, sharding_of
from ..ops import shift as shift_ops
from . import Decision, KernelCall, LayoutRule, Rule, bind, register_op
from .resample import domain_for, require_contiguous, resized


def _pad_signature(input, pad, mode="constant", value=None): ...


def _roll_signature(input, shifts, dims=None): ...


_PAD_SIG = inspect.signature(_pad_signature)
_ROLL_SIG = inspect.signature(_roll_signature)


def _planned(node, ctx, plan):
    """Run a planner; its refusals (sizes that do not split, pads wider than the tensor) name the node."""
    try:
        return plan()
    except Unsplittable as e:
        ctx.refuse(node, e.problem, e.remedy)
    except FxHaloError as e:
        ctx.refuse(node, f"cannot be planned ({e})", "check the op's arguments against the global size")


class PadRule(Rule):
    name = "pad"

    def decide(self, node, ctx) -> Decision:
        args = bind(_PAD_SIG, node)
        s = sharding_of(args["input"])
        if s is None:
            return Decision()
        ndim = example_value(args["input"]).ndim
        (lo, hi), _ = shift_ops.pad_entries(args["pad"], ndim, s.dim)
        if lo == 0 and hi == 0:
            return Decision(s)  # pads other dims only: local
        require_contiguous(node, ctx, s)
        mode, value = args["mode"], args["value"]
        _, m = _planned(
            node, ctx, lambda: shift_ops.pad_plan(domain_for(ctx, s), s.global_length, lo, hi, mode, value, "F.pad")
        )
        return Decision(resized(s, m, ctx), self.kernel_call, s)

    def kernel_call(self, node) -> KernelCall:
        a = bind(_PAD_SIG, node)
        return KernelCall(shift_ops.pad, (a["input"], tuple(a["pad"]), a["mode"], a["value"]))


class RollRule(Rule):
    name = "roll"

    def decide(self, node, ctx) -> Decision:
        args = bind(_ROLL_SIG, node)
        s = sharding_of(args["input"])
        if s is None:
            return Decision()
        if args["dims"] is None or args["dims"] == () or args["dims"] == []:
            ctx.refuse(
                node,
                "rolls the flattened tensor (no dims given), which mixes the sharded dim with all others",
                "pass dims=... to torch.roll",
            )
        ndim = example_value(args["input"]).ndim
        shift, _, _ = shift_ops.roll_shift(args["shifts"], args["dims"], s.dim, ndim)
        dims = args["dims"] if isinstance(args["dims"], (tuple, list)) else [args["dims"]]
        if not any(int(d) % ndim == s.dim for d in dims):
            return Decision(s)
        require_contiguous(node, ctx, s)
        _planned(node, ctx, lambda: shift_ops.roll_plan(domain_for(ctx, s), s.global_length, shift, "torch.roll"))
        return Decision(s, self.kernel_call, s)

    def kernel_call(self, node) -> KernelCall:
        a = bind(_ROLL_SIG, node)
        return KernelCall(shift_ops.roll, (a["input"], a["shifts"], a["dims"]))


class FlipRule(Rule):
    """``torch.flip(x, dims)``, ``x.flip(*dims)``, ``torch.fliplr`` (dim 1) and ``torch.flipud`` (dim 0)."""

    name = "flip"

    def __init__(self, fixed_dims=None):
        self.fixed_dims = fixed_dims

    def _dims(self, node) -> tuple[int, ...]:
        if self.fixed_dims is not None:
            return self.fixed_dims
        rest = list(node.args[1:]) or [node.kwargs.get("dims")]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        return tuple(int(d) for d in rest)

    def decide(self, node, ctx) -> Decision:
        x = node.args[0] if node.args else node.kwargs.get("input")
        s = sharding_of(x)
        if s is None:
            return Decision()
        ndim = example_value(x).ndim
        dims = self._dims(node)
        if not any(d % ndim == s.dim for d in dims):
            return Decision(s)
        require_contiguous(node, ctx, s)
        _planned(node, ctx, lambda: shift_ops.flip_plan(domain_for(ctx, s), s.global_length, "torch.flip"))
        return Decision(s, self.kernel_call, s)

    def kernel_call(self, node) -> KernelCall:
        x = node.args[0] if node.args else node.kwargs["input"]
        return KernelCall(shift_ops.flip, (x, self._dims(node)))


class PixelShuffleRule(LayoutRule):
    """``pixel_shuffle`` (``unshuffle=False``) or ``pixel_unshuffle`` on ``[..., C, H, W]``: local or refused."""

    name = "pixel_shuffle"

    def __init__(self, unshuffle: bool):
        self.unshuffle = unshuffle

    def layout(self, node, ctx):
        x, factor = (
            node.args[0],
            int(
                node.args[1]
                if len(node.args) > 1
                else node.kwargs.get("upscale_factor", node.kwargs.get("downscale_factor"))
            ),
        )
        s = sharding_of(x)
        if s is None:
            return None
        ndim = example_value(x).ndim
        channel = ndim - 3
        if s.dim < channel:
            return s  # a batch dim: every image stays on its rank
        require_contiguous(node, ctx, s)
        # How the sharded dim's length scales: rows and columns by the factor, channels by its square.
        num, den = (factor, 1) if s.dim > channel else (1, factor * factor)
        if self.unshuffle:
            num, den = den, num
        if s.global_length * num % den:
            ctx.refuse(
                node,
                f"gets a global length {s.global_length} along the sharded dim that {den} does not divide",
                "choose sizes divisible by the factor",
            )
        m = s.global_length * num // den
        domain = domain_for(ctx, s)
        if not domain.rescales(s.global_length, m):
            shards = domain.partition(s.global_length)
            if any((b - a) % den for a, b in shards):
                ctx.refuse(
                    node,
                    f"would split blocks of {den} rows along the sharded dim {s.dim} between ranks (shards {shards})",
                    f"choose sizes that give every rank a multiple of {den} rows",
                )
            scaled = tuple((b - a) * num // den for a, b in shards)
            if ctx.global_view:  # a DomainTensor carries any partition: each rank keeps its rows, scaled
                return Sharded(s.dim, scaled[domain.rank], Partitioned(scaled))
            ctx.refuse(
                node,
                f"turns the sharded dim's {int(s.global_length)} rows, split as {tuple(b - a for a, b in shards)}, "
                f"into {m} rows split as {scaled}, not as the partition rule splits {m} rows "
                f"({tuple(b - a for a, b in domain.partition(m))}) on local slabs",
                "pass DomainTensors (the global view keeps each rank's rows, split as "
                f"{scaled}), or give the sharded dim a length that the ranks split evenly",
            )
        return resized(s, m, ctx)


register_op(PadRule(), "pad")
register_op(RollRule(), "roll")
register_op(FlipRule(), "flip")
register_op(FlipRule((1,)), "fliplr")
register_op(FlipRule((0,)), "flipud")
register_op(PixelShuffleRule(False), "pixel_shuffle")
register_op(PixelShuffleRule(True), "pixel_unshuffle")
