"""Resampling along the sharded dim: interpolation and pooling (windowed, adaptive and global)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..ops import adaptive_pool as adaptive_ops
from ..ops import grad as grad_ops
from ..ops import interpolate as interpolate_ops
from ..ops import pool as pool_ops
from ..ops import reduce as reduce_ops
from .base import _domain, _Wrapper, group_name_of


class DomainParallelInterpolate(nn.Module):
    """``F.interpolate`` of a slab, giving this rank's rows of the global result.

    ``size`` is the **global** output size (all spatial dims, as one device would
    ask for it), not this rank's share: the layer then means the same thing on
    one device and on ``P`` ranks.  A ``scale_factor`` scales the global length
    too.  Source coordinates are computed in global coordinates and clamp at the
    *global* edges, never at a shard edge.  Modes:
    ``nearest``, ``nearest-exact``, ``linear``, ``bilinear``, ``bicubic``,
    ``trilinear``; no ``antialias``.
    """

    def __init__(
        self,
        size=None,
        scale_factor=None,
        mode: str = "bilinear",
        align_corners=None,
        shard_dim: int = -2,
        group=None,
        *,
        recompute_scale_factor=None,
    ):
        super().__init__()
        if (size is None) == (scale_factor is None):
            raise ValueError("DomainParallelInterpolate: give exactly one of size and scale_factor")
        if mode not in interpolate_ops.MODES:
            raise ValueError(f"DomainParallelInterpolate: mode {mode!r} is not one of {interpolate_ops.MODES}")
        if align_corners is not None and mode in ("nearest", "nearest-exact"):
            raise ValueError(
                "align_corners option can only be set with the interpolating modes: "
                "linear | bilinear | bicubic | trilinear"
            )
        self.size = tuple(size) if isinstance(size, (list, tuple)) else size
        self.scale_factor = tuple(scale_factor) if isinstance(scale_factor, (list, tuple)) else scale_factor
        self.mode = mode
        self.align_corners = align_corners
        self.recompute_scale_factor = recompute_scale_factor
        self.shard_dim = int(shard_dim)
        self.group_name = group_name_of(group)

    @classmethod
    def from_upsample(cls, upsample: nn.Upsample, shard_dim: int = -2, group=None) -> DomainParallelInterpolate:
        """The same resize as an ``nn.Upsample`` (or ``UpsamplingNearest2d``/``UpsamplingBilinear2d``)."""
        return cls(
            upsample.size,
            upsample.scale_factor,
            upsample.mode,
            upsample.align_corners,
            shard_dim,
            group,
            recompute_scale_factor=upsample.recompute_scale_factor,
        )

    def forward(self, x):
        domain = _domain(self.group_name, self.shard_dim)
        args = (x, self.size, self.scale_factor, self.mode, self.align_corners, self.recompute_scale_factor)
        if domain is None:
            return F.interpolate(*args)
        # A sharded batch or channel dim is resized on each rank as it is (the kernel knows).
        return interpolate_ops.interpolate(*args, axes=domain.kernel_axes(domain.dim_of(x.ndim)))

    def extra_repr(self) -> str:
        how = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        group = "WORLD" if self.group_name is None else repr(self.group_name)
        return (
            f"{how}, mode={self.mode!r}, align_corners={self.align_corners}, shard_dim={self.shard_dim}, group={group}"
        )


#: pooling type -> (kind, spatial dims)
POOLS = {
    nn.MaxPool1d: ("max", 1),
    nn.MaxPool2d: ("max", 2),
    nn.MaxPool3d: ("max", 3),
    nn.AvgPool1d: ("avg", 1),
    nn.AvgPool2d: ("avg", 2),
    nn.AvgPool3d: ("avg", 3),
    nn.AdaptiveAvgPool1d: ("adaptive_avg", 1),
    nn.AdaptiveAvgPool2d: ("adaptive_avg", 2),
    nn.AdaptiveAvgPool3d: ("adaptive_avg", 3),
    nn.AdaptiveMaxPool1d: ("adaptive_max", 1),
    nn.AdaptiveMaxPool2d: ("adaptive_max", 2),
    nn.AdaptiveMaxPool3d: ("adaptive_max", 3),
}


def pools_to_one(pool, sdim) -> bool:
    """Does ``pool`` (an ``nn`` pool or a :class:`DomainParallelPool`) pool spatial dim ``sdim`` to one row,
    values only?  Then it is a global pool along that dim: a reduction, not a window."""
    nd = getattr(pool, "nd", None) or next(v for t, v in POOLS.items() if isinstance(pool, t))[1]
    size = getattr(pool, "output_size", None)
    if size is None or getattr(pool, "return_indices", False) or not isinstance(sdim, int) or not 0 <= sdim < nd:
        return False
    return (list(size) if isinstance(size, (tuple, list)) else [size] * nd)[sdim] == 1


class DomainParallelPool(_Wrapper):
    """Max, average and adaptive pooling (1-D to 3-D) over a sharded spatial dim.

    Windows that cross a shard edge get a halo (``-inf`` or zeros past the global
    edges, as the op pads); average divisors follow the window's place in the
    global tensor; max indices refer to the global input.  An adaptive pool's
    ``output_size`` along the sharded dim is the global length.

    An adaptive pool to **one** row along the sharded dim (global pooling, without
    ``return_indices``) is a reduction over all ranks (:func:`fxhalo.ops.reduce.adaptive_avg_pool`,
    :func:`~fxhalo.ops.reduce.adaptive_max_pool`, as the compiled rule): its output is
    *replicated*, the same on every rank, and, as for :func:`fxhalo.gather`, the gradient
    the user's ``backward`` gives it is the full one on every rank (the layer divides it
    by the group size before the collective's backward sums it).  Input gradients are
    then exact.  Layers after it run replicated: their parameter gradients are full on
    every rank already, so leave them out of :func:`~fxhalo.nn.reduce_gradients`.
    """

    wraps = tuple(POOLS)

    def __init__(self, pool, shard_dim: int = -2, group=None):
        super().__init__(pool, shard_dim, group)
        self.kind, self.nd = (
            POOLS[type(pool)] if type(pool) in POOLS else next(v for t, v in POOLS.items() if isinstance(pool, t))
        )
        for attr in (
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "ceil_mode",
            "return_indices",
            "count_include_pad",
            "divisor_override",
            "output_size",
        ):
            if hasattr(pool, attr):
                setattr(self, attr, getattr(pool, attr))

    def _call(self, fns, x, **kw):
        nd = self.nd
        if self.kind == "max":
            return fns[f"max_pool{nd}d"](
                x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, self.return_indices, **kw
            )
        if self.kind == "avg":
            extra = (self.divisor_override,) if nd > 1 else ()
            return fns[f"avg_pool{nd}d"](
                x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad, *extra, **kw
            )
        if self.kind == "adaptive_max":
            return fns[f"adaptive_max_pool{nd}d"](x, self.output_size, self.return_indices, **kw)
        return fns[f"adaptive_avg_pool{nd}d"](x, self.output_size, **kw)

    def forward(self, x):
        domain = self.domain()
        # Pooling never mixes planes: a sharded batch or channel dim is local (the kernel knows).
        if domain is None:
            return self._call(vars(F), x)
        dim = domain.dim_of(x.ndim)
        if pools_to_one(self, dim - (x.ndim - self.nd)):
            kernel = reduce_ops.adaptive_max_pool if self.kind == "adaptive_max" else reduce_ops.adaptive_avg_pool
            y = kernel(x, self.output_size, nd=self.nd, axes=domain.kernel_axes(dim))
            return grad_ops.replicated_output(y, group_name=domain.group_name, size=domain.size)
        return self._call({**vars(pool_ops), **vars(adaptive_ops)}, x, axes=domain.kernel_axes(dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}"
