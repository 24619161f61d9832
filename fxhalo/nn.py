"""Eager domain-parallel layers: thin modules around the kernels of :mod:`fxhalo.ops`.

For users who do not compile.  Each wrapper takes the ``torch.nn`` module it
replaces, the sharded tensor dim and the process group, and its ``forward`` calls
the *same* functional kernel the ``domain_parallel`` graph rewrite inserts (one
implementation of each op).  ``fxhalo.convert_to_domain_parallel`` puts them into
a model.

Three guarantees every wrapper keeps:

* **One device's answer.**  On a slab of the global input, the forward gives this
  rank's rows of the wrapped module's output on the gathered tensor, and the
  backward gives this rank's rows of the input gradient.  Parameter gradients are
  *partial*: summed over the domain group they are one device's (the convention of
  the compiled path; :func:`reduce_gradients` does the sum).
* **The same state dict.**  A wrapper adopts the wrapped module's parameters,
  buffers and child modules under their own names (it adds no prefix), so a
  checkpoint of the plain model loads into the converted one and back.
* **Nothing to do alone.**  With no process group initialised, or a group of one
  rank, the wrapper runs exactly the wrapped module's torch op.

A wrapper runs the local op, with no communication, when the sharded dim is the
batch dim (dim 0) of its input: every sample is then whole on its rank (this is
also the case of a tensor whose spatial dims have been reduced away, such as a
``BatchNorm1d`` on pooled ``(N, C)`` features with ``shard_dim=-2``).  It raises
:class:`~fxhalo.errors.FxHaloError` when the sharded dim is the channel dim of an
op that mixes or normalises channels.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .domain import Domain, resolve_group
from .errors import FxHaloError
from .ops import conv as conv_ops
from .ops import conv_transpose as conv_transpose_ops
from .ops import interpolate as interpolate_ops
from .ops import norm as norm_ops
from .ops import pool as pool_ops
from .ops.rows import ints

__all__ = [
    "DomainParallelConv1d",
    "DomainParallelConv2d",
    "DomainParallelConv3d",
    "DomainParallelConvTranspose1d",
    "DomainParallelConvTranspose2d",
    "DomainParallelConvTranspose3d",
    "DomainParallelGroupNorm",
    "DomainParallelInstanceNorm",
    "DomainParallelBatchNorm",
    "DomainParallelPeriodicConv2d",
    "DomainParallelInterpolate",
    "DomainParallelPool",
    "WRAPPERS",
    "POOLS",
    "group_name_of",
    "reduce_gradients",
]


def group_name_of(group) -> str | None:
    """The name of a group given as a ProcessGroup, a name, a DeviceMesh or ``(mesh, axis)``.

    ``None`` stays ``None`` (WORLD, looked up at call time, so a model may be
    converted before ``init_process_group``).  A name, not the group object, is
    what a module keeps: names survive ``copy.deepcopy`` and pickling.
    """
    if group is None or isinstance(group, str):
        return group
    return resolve_group(group).group_name


def _domain(group_name: str | None, shard_dim: int) -> Domain | None:
    """The domain a wrapper works in now, or None when it should run the plain op."""
    if group_name is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group_name = dist.group.WORLD.group_name
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    return domain if domain.size > 1 else None


def reduce_gradients(module: nn.Module, group=None) -> None:
    """Sum every parameter gradient of ``module`` over the domain group, in place.

    Each rank's backward gives a partial gradient (the contribution of its slab);
    the sum is one device's gradient.  Call it after ``backward()`` and before the
    optimizer step.  (DDP over the domain group would *average* instead, which is
    off by the group size.)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    pg = resolve_group(group)
    if dist.get_world_size(pg) == 1:
        return
    # One all_reduce per dtype and device, not one per parameter.
    buckets: dict = {}
    for p in module.parameters():
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pg)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))


class _Wrapper(nn.Module):
    """Adopts the wrapped module's parameters, buffers and children under the same names.

    The wrapped module itself is not kept: holding it would leave a second,
    stale owner of the parameters after ``.to()`` or ``load_state_dict``
    replaces them.  Subclasses copy the configuration they need.
    """

    #: torch.nn types a wrapper accepts
    wraps: tuple[type, ...] = ()

    def __init__(self, module: nn.Module, shard_dim: int, group):
        if self.wraps and not isinstance(module, self.wraps):
            names = ", ".join(t.__name__ for t in self.wraps)
            raise FxHaloError(f"{type(self).__name__} wraps {names}, not {type(module).__name__}")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise FxHaloError(
                f"{type(self).__name__}: {type(module).__name__} has uninitialised (lazy) parameters. Remedy: "
                "run one forward pass on one device first, or build the non-lazy layer"
            )
        super().__init__()
        self.shard_dim = int(shard_dim)
        self.group_name = group_name_of(group)
        self.wrapped_type = type(module)
        self.training = module.training
        # The state dict records each module's _version; keep the wrapped one's.
        self._version = getattr(module, "_version", 1)
        for name, p in module._parameters.items():
            self.register_parameter(name, p)
        for name, b in module._buffers.items():
            self.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module._modules.items():
            self.add_module(name, child)

    def domain(self) -> Domain | None:
        return _domain(self.group_name, self.shard_dim)

    def _sharded_dim(self, x: torch.Tensor, d: int, spatial: int) -> int | None:
        """``d``, the sharded dim of ``x``, when it is one of the op's ``spatial`` last dims.

        None when it is the batch dim (the op is then local); raises when it is a
        channel dim, which these ops mix or normalise.
        """
        if d >= x.ndim - spatial:
            return d
        if d == 0 and x.ndim == spatial + 2:
            return None
        raise FxHaloError(
            f"{type(self).__name__}: shard_dim={self.shard_dim} names dim {d}, a channel dim of its "
            f"{x.ndim}-D input {tuple(x.shape)}; the op mixes or normalises channels, so only a spatial dim (or the "
            "batch dim) may be sharded. Pass the shard_dim of a spatial dim."
        )

    def extra_repr(self) -> str:
        group = "WORLD" if self.group_name is None else repr(self.group_name)
        return f"{self.wrapped_type.__name__}, shard_dim={self.shard_dim}, group={group}"


# -- convolutions ------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _DomainParallelConvNd(_Wrapper):
    nd = 2

    def __init__(self, conv, shard_dim: int, group=None):
        super().__init__(conv, shard_dim, group)
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attr, getattr(conv, attr))

    def _local(self, x):
        op = _CONV[self.nd]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return op(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return op(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        domain = self.domain()
        dim = None if domain is None else self._sharded_dim(x, domain.dim_of(x.ndim), self.nd)
        if dim is None:
            return self._local(x)
        kwargs = dict(shard_dim=dim, group_name=domain.group_name)
        padding = self.padding
        if self.padding_mode != "zeros":
            # As torch does: the mode's pad first, then an unpadded conv.  Along the
            # sharded dim the pad is folded into the halo (the mode applies at the
            # global edges only); the other dims are padded locally, before the
            # exchange, so halo rows arrive padded.
            axis = dim - (x.ndim - self.nd)
            pads = conv_ops.explicit_padding(self.padding, self.kernel_size, self.dilation)
            kwargs.update(edge_mode=self.padding_mode, edge_extent=pads[axis])
            rest = [p for i, lo_hi in reversed(list(enumerate(pads))) for p in ((0, 0) if i == axis else lo_hi)]
            if any(rest):
                x = F.pad(x, rest, mode=self.padding_mode)
            padding = 0
        return conv_ops.conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, **kwargs)


class DomainParallelConv1d(_DomainParallelConvNd):
    """``nn.Conv1d`` over a sharded length: one halo exchange, then the local conv.

    Exact for any kernel, stride, dilation, padding (int, ``'same'``, ``'valid'``)
    and ``padding_mode`` (``reflect``/``replicate``/``circular`` act at the global
    edges only).  The global output length must split evenly over the ranks.
    """

    nd, wraps = 1, (nn.Conv1d,)

    def __init__(self, conv: nn.Conv1d, shard_dim: int = -1, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConv2d(_DomainParallelConvNd):
    """``nn.Conv2d`` over a sharded spatial dim (H by default); see :class:`DomainParallelConv1d`."""

    nd, wraps = 2, (nn.Conv2d,)

    def __init__(self, conv: nn.Conv2d, shard_dim: int = -2, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConv3d(_DomainParallelConvNd):
    """``nn.Conv3d`` over a sharded spatial dim (H of ``(B, C, T, H, W)`` by default)."""

    nd, wraps = 3, (nn.Conv3d,)

    def __init__(self, conv: nn.Conv3d, shard_dim: int = 3, group=None):
        super().__init__(conv, shard_dim, group)


class _DomainParallelConvTransposeNd(_Wrapper):
    nd = 2

    def __init__(self, conv, shard_dim: int, group=None):
        super().__init__(conv, shard_dim, group)
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "output_padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            setattr(self, attr, getattr(conv, attr))

    def _output_padding(self, spatial, output_size):
        """torch's ``output_size`` -> ``output_padding`` rule, on the given (global) spatial lengths."""
        if output_size is None:
            return self.output_padding
        nd, size = self.nd, list(output_size)
        if len(size) in (nd + 1, nd + 2):
            size = size[-nd:]
        if len(size) != nd:
            raise ValueError(f"ConvTranspose{nd}d: output_size must have {nd} spatial entries, got {output_size}")
        out = []
        for n, m, k, s, p, d in zip(spatial, size, self.kernel_size, self.stride, self.padding, self.dilation):
            smallest = (n - 1) * s - 2 * p + d * (k - 1) + 1
            if not smallest <= m < smallest + s:
                raise ValueError(
                    f"requested an output size of {size}, but valid sizes for the global input "
                    f"{tuple(spatial)} start at {smallest} along one axis (+ at most {s - 1})"
                )
            out.append(m - smallest)
        return tuple(out)

    def forward(self, x, output_size=None):
        """``output_size`` (optional) is the *global* output size, as on one device."""
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for ConvTranspose{self.nd}d")
        domain = self.domain()
        dim = None if domain is None else self._sharded_dim(x, domain.dim_of(x.ndim), self.nd)
        spatial = list(x.shape[x.ndim - self.nd :])
        if dim is None:
            return _CONV_T[self.nd](
                x,
                self.weight,
                self.bias,
                self.stride,
                self.padding,
                self._output_padding(spatial, output_size),
                self.groups,
                self.dilation,
            )
        if output_size is not None:  # it names global sizes: compare with the global input length
            spatial[dim - (x.ndim - self.nd)] = domain.global_length(x.shape[dim])
        return conv_transpose_ops.conv_transpose(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self._output_padding(spatial, output_size),
            self.groups,
            self.dilation,
            shard_dim=dim,
            group_name=domain.group_name,
        )


class DomainParallelConvTranspose1d(_DomainParallelConvTransposeNd):
    """``nn.ConvTranspose1d`` over a sharded length: halo, local op, crop to this rank's rows."""

    nd, wraps = 1, (nn.ConvTranspose1d,)

    def __init__(self, conv: nn.ConvTranspose1d, shard_dim: int = -1, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConvTranspose2d(_DomainParallelConvTransposeNd):
    """``nn.ConvTranspose2d`` over a sharded spatial dim (H by default)."""

    nd, wraps = 2, (nn.ConvTranspose2d,)

    def __init__(self, conv: nn.ConvTranspose2d, shard_dim: int = -2, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConvTranspose3d(_DomainParallelConvTransposeNd):
    """``nn.ConvTranspose3d`` over a sharded spatial dim (H of ``(B, C, T, H, W)`` by default)."""

    nd, wraps = 3, (nn.ConvTranspose3d,)

    def __init__(self, conv: nn.ConvTranspose3d, shard_dim: int = 3, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelPeriodicConv2d(_Wrapper):
    """A weather model's periodic conv: circular pad along W (longitude), reflect along H (poles), unpadded conv.

    Wraps a module with a ``conv`` (``nn.Conv2d``) and a ``padding`` (an int, or
    ``(ph, pw)``) whose forward is ``conv(pad_H(pad_W(x, circular), reflect))``, as
    CREDIT's ``PeriodicConv2d``.  ``h_mode``/``w_mode`` name other ``F.pad`` modes
    if a model uses them.  The pad along the sharded dim is folded into the conv's
    halo, so it applies at the *global* edges only (the poles, or the date line
    when W is sharded); the pad along the other dim is local.  Exact: one device
    running the same pads on the gathered tensor gives the same rows.
    State-dict keys stay ``conv.weight`` and ``conv.bias``.
    """

    def __init__(
        self,
        periodic_conv: nn.Module,
        shard_dim: int = -2,
        group=None,
        *,
        h_mode: str = "reflect",
        w_mode: str = "circular",
    ):
        conv = getattr(periodic_conv, "conv", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(periodic_conv, "padding"):
            raise FxHaloError(
                "DomainParallelPeriodicConv2d wraps a module with a `conv` (nn.Conv2d) and a "
                f"`padding` attribute; {type(periodic_conv).__name__} has not both"
            )
        if conv.padding_mode != "zeros" and any(ints(conv.padding, 2)):
            raise FxHaloError(
                "DomainParallelPeriodicConv2d: the inner conv pads with "
                f"padding_mode={conv.padding_mode!r} after the periodic pad; only zeros can follow it"
            )
        super().__init__(periodic_conv, shard_dim, group)
        ph, pw = ints(periodic_conv.padding, 2)
        self.padding = (ph, pw)
        self.modes = (h_mode, w_mode)

    @property
    def weight(self):
        return self.conv.weight

    @property
    def bias(self):
        return self.conv.bias

    def _pad(self, x, axis: int):
        """The periodic pad of spatial ``axis`` (0: H, 1: W) of ``x``, locally."""
        p = self.padding[axis]
        if not p:
            return x
        spec = (0, 0, p, p) if axis == 0 else (p, p, 0, 0)  # torch wants both dims for a 4-D input
        return F.pad(x, spec, mode=self.modes[axis])

    def forward(self, x):
        domain = self.domain()
        dim = None if domain is None else self._sharded_dim(x, domain.dim_of(x.ndim), 2)
        if dim is None:
            return self.conv(self._pad(self._pad(x, 1), 0))
        axis = dim - (x.ndim - 2)
        x = self._pad(x, 1 - axis)
        c = self.conv
        return conv_ops.conv(
            x,
            c.weight,
            c.bias,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            shard_dim=dim,
            group_name=domain.group_name,
            edge_mode=self.modes[axis],
            edge_extent=(self.padding[axis], self.padding[axis]),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding={self.padding}, modes(H, W)={self.modes}"


# -- normalisation ---------------------------------------------------------------


class DomainParallelGroupNorm(_Wrapper):
    """``nn.GroupNorm`` whose statistics span the sharded dim: one all_reduce of the statistics.

    The backward carries the cross-rank terms (autograd through the functional
    all_reduce), which CREDIT's GroupNorm misses.
    """

    wraps = (nn.GroupNorm,)

    def __init__(self, norm: nn.GroupNorm, shard_dim: int = -2, group=None):
        super().__init__(norm, shard_dim, group)
        for attr in ("num_groups", "num_channels", "eps", "affine"):
            setattr(self, attr, getattr(norm, attr))

    def forward(self, x):
        domain = self.domain()
        dim = None if domain is None else self._sharded_dim(x, domain.dim_of(x.ndim), max(x.ndim - 2, 0))
        if dim is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return norm_ops.group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps, shard_dim=dim, group_name=domain.group_name
        )


class DomainParallelInstanceNorm(_Wrapper):
    """``nn.InstanceNorm1d/2d/3d``: per-(sample, channel) statistics over the global spatial extent.

    CREDIT leaves InstanceNorm unconverted, which normalises each slab by its own
    statistics.  Running statistics (``track_running_stats=True``) are updated as
    on one device, the same on every rank.
    """

    wraps = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

    def __init__(self, norm, shard_dim: int = -2, group=None):
        super().__init__(norm, shard_dim, group)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, attr, getattr(norm, attr))
        self.nd = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[
            next(t for t in self.wraps if isinstance(norm, t))
        ]

    def forward(self, x):
        nd = self.nd
        if x.ndim not in (nd + 1, nd + 2):
            raise ValueError(f"expected {nd + 1}D or {nd + 2}D input (got {x.ndim}D input)")
        if x.size(x.ndim - nd - 1) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={x.ndim - nd - 1} to match num_features "
                    f"({self.num_features}), but got: {x.size(x.ndim - nd - 1)}."
                )
            warnings.warn(
                "input's size at the channel dim does not match num_features, which is not used because affine=False",
                stacklevel=2,
            )
        domain = self.domain()
        # An unbatched input is normalised as a batch of one, as torch does.
        batched = x if x.ndim == nd + 2 else x.unsqueeze(0)
        dim = None if domain is None else self._sharded_dim(batched, domain.dim_of(x.ndim) + batched.ndim - x.ndim, nd)
        args = (
            batched,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        if dim is None:
            out = F.instance_norm(*args)
        else:
            out = norm_ops.instance_norm(*args, shard_dim=dim, group_name=domain.group_name)
        return out if x.ndim == nd + 2 else out.squeeze(0)


class DomainParallelBatchNorm(_Wrapper):
    """``nn.BatchNorm1d/2d/3d``: in training, per-channel statistics over the batch and the global spatial extent.

    In eval mode the running statistics normalise and nothing is communicated.
    ``num_batches_tracked`` and the running statistics advance as on one device.
    """

    wraps = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    _NDIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}

    def __init__(self, norm, shard_dim: int = -2, group=None):
        super().__init__(norm, shard_dim, group)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, attr, getattr(norm, attr))
        self.ndims = self._NDIMS[next(t for t in self.wraps if isinstance(norm, t))]

    def forward(self, x):
        if x.ndim not in self.ndims:
            raise ValueError(f"expected {' or '.join(f'{n}D' for n in self.ndims)} input (got {x.ndim}D input)")
        # torch's nn.BatchNorm forward, step for step, with the kernel in place of F.batch_norm.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        args = (
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        domain = self.domain()
        local = domain is None or not use_batch_stats  # eval mode: running statistics, nothing to share
        dim = None if local else self._sharded_dim(x, domain.dim_of(x.ndim), x.ndim - 2)
        if dim is None:
            return F.batch_norm(*args)
        return norm_ops.batch_norm(*args, shard_dim=dim, group_name=domain.group_name)


# -- resampling ------------------------------------------------------------------


class DomainParallelInterpolate(nn.Module):
    """``F.interpolate`` of a slab, giving this rank's rows of the global result.

    ``size`` is the **global** output size (all spatial dims, as one device would
    ask for it), not this rank's share: the layer then means the same thing on
    one device and on ``P`` ranks.  A ``scale_factor`` scales the global length
    too.  Source coordinates are computed in global coordinates and clamp at the
    *global* edges (CREDIT's version clamps at every shard edge).  Modes:
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
        return interpolate_ops.interpolate(*args, shard_dim=domain.dim_of(x.ndim), group_name=domain.group_name)

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


class DomainParallelPool(_Wrapper):
    """Max, average and adaptive pooling (1-D to 3-D) over a sharded spatial dim.

    Windows that cross a shard edge get a halo (``-inf`` or zeros past the global
    edges, as the op pads); average divisors follow the window's place in the
    global tensor; max indices refer to the global input.  An adaptive pool's
    ``output_size`` along the sharded dim is the global length.  Pooling the
    sharded dim down to one row (global pooling) is refused: its output would be
    replicated, which the eager layer's gradient convention does not cover.
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
        return self._call(vars(pool_ops), x, shard_dim=domain.dim_of(x.ndim), group_name=domain.group_name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}"


#: torch.nn type -> the wrapper that replaces it (what convert_to_domain_parallel uses)
WRAPPERS: dict[type, type] = {
    nn.Conv1d: DomainParallelConv1d,
    nn.Conv2d: DomainParallelConv2d,
    nn.Conv3d: DomainParallelConv3d,
    nn.ConvTranspose1d: DomainParallelConvTranspose1d,
    nn.ConvTranspose2d: DomainParallelConvTranspose2d,
    nn.ConvTranspose3d: DomainParallelConvTranspose3d,
    nn.GroupNorm: DomainParallelGroupNorm,
    **{t: DomainParallelInstanceNorm for t in DomainParallelInstanceNorm.wraps},
    **{t: DomainParallelBatchNorm for t in DomainParallelBatchNorm.wraps},
    **{t: DomainParallelPool for t in POOLS},
}
