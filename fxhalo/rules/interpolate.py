"""``F.interpolate`` (and the deprecated ``F.upsample*``) along the sharded dim.

Dynamo records these as the Python functions themselves.  ``size`` along the
sharded dim is read as the *global* output length, as the model states it for the
whole tensor; a ``scale_factor`` gives ``floor(N * scale)`` global rows.

* ``nearest``, ``nearest-exact``, ``linear``, ``bilinear``, ``bicubic``,
  ``trilinear``: the kernel :func:`fxhalo.ops.interpolate.interpolate`, or nothing
  when the planner proves every rank's rows come from its own rows with the local
  op's own mapping (a scale factor, not a size, so the node stays valid as it is).
* ``area`` is adaptive average pooling to the output size (as torch implements
  it), so it becomes :func:`fxhalo.ops.adaptive_pool.adaptive_avg_pool2d` and friends.
* ``antialias=True`` and other modes are refused: their footprint is not planned.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..layout import example_value
from ..ops import adaptive_pool as adaptive_ops
from ..ops import interpolate as interp_ops
from ..ops.rows import spatial_index
from . import register
from .resample import Resampled, ResampleRule, domain_for, require_contiguous, resized, static_or_refuse

_AREA_KERNELS = {
    1: adaptive_ops.adaptive_avg_pool1d,
    2: adaptive_ops.adaptive_avg_pool2d,
    3: adaptive_ops.adaptive_avg_pool3d,
}


def _interpolate_signature(
    input,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
): ...


_FULL = inspect.signature(_interpolate_signature)


def _upsample_signature(input, size=None, scale_factor=None, mode="nearest", align_corners=None): ...


def _upsample_nearest_signature(input, size=None, scale_factor=None): ...


class InterpolateRule(ResampleRule):
    name = "interpolate"

    def __init__(self, signature_of, **fixed):
        self.signature = inspect.signature(signature_of)
        self._fixed = fixed  # what the deprecated spellings pass to F.interpolate

    def _canonical(self, args) -> dict:
        """The node's arguments as ``F.interpolate``'s, defaults and fixed spellings filled in."""
        full = {name: p.default for name, p in _FULL.parameters.items()}
        full.update({k: v for k, v in args.items() if k in full})
        full.update(self._fixed)
        return full

    def plan(self, node, ctx, args, s):
        a = self._canonical(args)
        static_or_refuse(node, ctx, size=a["size"], scale_factor=a["scale_factor"])
        ndim = example_value(a["input"]).ndim
        nd = ndim - 2
        sdim = spatial_index(ndim, nd, s.dim)
        if sdim is None:  # batch or channel sharded: every plane is resized on its own rank
            return Resampled(s)
        require_contiguous(node, ctx, s)
        if a["mode"] == "area":
            return self._area(ctx, a, s, nd, sdim)
        mode = a["mode"]
        if mode not in interp_ops.MODES or a["antialias"]:
            ctx.refuse(
                node,
                f"uses mode {mode!r}" + (" with antialias=True" if a["antialias"] else ""),
                f"use one of the modes {interp_ops.MODES} without antialias, or resize before sharding",
            )
        align = bool(a["align_corners"]) if mode not in ("nearest", "nearest-exact") else False
        n = s.global_length
        resize = interp_ops.dim_resize(n, a["size"], a["scale_factor"], a["recompute_scale_factor"], sdim, nd)
        val = example_value(a["input"])
        plan = interp_ops.plan_interpolate(
            mode,
            nd,
            sdim,
            resize,
            align,
            val.dtype == torch.float64,
            val.device.type,
            domain_for(ctx, s),
            f"interpolate (mode {mode!r}, size {a['size']}, scale_factor {a['scale_factor']})",
        )
        out = resized(s, resize.n_out, ctx)
        if (
            plan.local
            and a["size"] is None
            and interp_ops.dim_resize(s.local, None, a["scale_factor"], None, sdim, nd).n_out == out.local
        ):
            return Resampled(out)  # the node's own scale factor gives each rank its rows
        call = tuple(a[name] for name in _FULL.parameters)
        return Resampled(out, interp_ops.interpolate, call)

    def _area(self, ctx, a, s, nd, sdim):
        """``mode='area'`` is adaptive average pooling to the (recomputed) output size."""
        spatial = list(example_value(a["input"]).shape[2:])
        spatial[sdim] = s.global_length
        sizes = tuple(
            interp_ops.dim_resize(spatial[i], a["size"], a["scale_factor"], True, i, nd).n_out for i in range(nd)
        )
        adaptive_ops.plan_adaptive(
            domain_for(ctx, s), s.global_length, sizes[sdim], f"adaptive_avg_pool{nd}d (output size {sizes})"
        )
        return Resampled(resized(s, sizes[sdim], ctx), _AREA_KERNELS[nd], (a["input"], sizes))


register(InterpolateRule(_interpolate_signature), F.interpolate)
register(InterpolateRule(_upsample_signature, recompute_scale_factor=None), F.upsample)
register(InterpolateRule(_upsample_nearest_signature, mode="nearest"), F.upsample_nearest)
register(InterpolateRule(_upsample_nearest_signature, mode="bilinear", align_corners=True), F.upsample_bilinear)
