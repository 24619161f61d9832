"""Group, instance, batch, layer and RMS norm whose statistics span the sharded dim: one all_reduce each."""

from __future__ import annotations

import warnings

import torch.nn as nn
import torch.nn.functional as F

from ..errors import FxHaloError
from ..ops import norm as norm_ops
from .base import _Wrapper


class DomainParallelGroupNorm(_Wrapper):
    """``nn.GroupNorm`` whose statistics span the sharded dim: one all_reduce of the statistics.

    The backward carries the cross-rank terms (autograd through the functional
    all_reduce): a norm's gradient depends on every rank's rows through its statistics.
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
        return norm_ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, axes=domain.kernel_axes(dim))


class DomainParallelInstanceNorm(_Wrapper):
    """``nn.InstanceNorm1d/2d/3d``: per-(sample, channel) statistics over the global spatial extent.

    Left as the plain module, it would normalise each slab by its own statistics:
    wrong near every shard edge.  Running statistics (``track_running_stats=True``) are updated as
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
            out = norm_ops.instance_norm(*args, axes=domain.kernel_axes(dim))
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
        return norm_ops.batch_norm(*args, axes=domain.kernel_axes(dim))


class DomainParallelLayerNorm(_Wrapper):
    """``nn.LayerNorm`` or ``nn.RMSNorm`` whose ``normalized_shape`` covers the sharded dim.

    The module is built with the *global* ``normalized_shape`` (its weight and bias
    have the global shape); each rank normalises its slab with the global
    statistics (one all_reduce) and applies its own rows of the weight and bias.
    Over dims that leave the sharded dim out, it is the plain module.
    """

    wraps = (nn.LayerNorm, nn.RMSNorm)

    def __init__(self, norm, shard_dim: int = -2, group=None):
        super().__init__(norm, shard_dim, group)
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.rms = isinstance(norm, nn.RMSNorm)

    def _plain(self, x, shape, weight, bias):
        if self.rms:
            return F.rms_norm(x, shape, weight, self.eps)
        return F.layer_norm(x, shape, weight, bias, self.eps)

    def forward(self, x):
        domain = self.domain()
        n = len(self.normalized_shape)
        d = None if domain is None else domain.dim_of(x.ndim)
        if d is None or d < x.ndim - n:
            return self._plain(x, self.normalized_shape, self.weight, getattr(self, "bias", None))
        sdim = d - (x.ndim - n)  # the sharded dim's place in normalized_shape
        length = self.normalized_shape[sdim]
        a, b = domain.bounds(length)
        if x.shape[d] != b - a:
            raise FxHaloError(
                f"{type(self).__name__}: normalized_shape {self.normalized_shape} is the global shape, so this "
                f"rank's slab should hold rows [{a}, {b}) of its dim {d}, but it has {x.shape[d]}. Remedy: shard "
                "the input with fxhalo.shard(x).to_local() (the balanced partition)"
            )
        shape = tuple(x.shape[x.ndim - n :])
        weight, bias = (
            None if t is None else t.narrow(sdim, a, b - a) for t in (self.weight, getattr(self, "bias", None))
        )
        kw = dict(axes=domain.kernel_axes(d, length))
        if self.rms:
            return norm_ops.rms_norm(x, shape, weight, self.eps, **kw)
        return norm_ops.layer_norm(x, shape, weight, bias, self.eps, **kw)
