"""Convolutions over a sharded spatial dim: one wrapper per family, its dimensionality read from the module.

:class:`DomainParallelConv` wraps ``nn.Conv1d/2d/3d`` and
:class:`DomainParallelConvTranspose` wraps ``nn.ConvTranspose1d/2d/3d``.  The
``DomainParallelConv1d/2d/3d`` and ``DomainParallelConvTranspose1d/2d/3d`` names
are the same classes narrowed to one dimensionality, with that dimensionality's
default ``shard_dim`` (what ``convert_to_domain_parallel`` puts in).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..errors import FxHaloError
from ..ops import conv as conv_ops
from ..ops import conv_transpose as conv_transpose_ops
from ..ops.rows import ints
from .base import _Wrapper

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: spatial dims -> the default ``shard_dim``: the length of ``(B, C, L)``, H of ``(B, C, H, W)``
#: and H of ``(B, C, T, H, W)`` (3: the latitude of a weather model's input; the same dim as -2 for a batched input)
DEFAULT_SHARD_DIM = {1: -1, 2: -2, 3: 3}


class _ConvFamily(_Wrapper):
    """A conv-like wrapper: copies ``attrs`` from the module and reads ``nd`` from its kernel size."""

    attrs: tuple[str, ...] = ()

    def __init__(self, conv, shard_dim: int | None = None, group=None):
        self._accept(conv)  # before nd is read from the module
        nd = len(conv.kernel_size)
        super().__init__(conv, DEFAULT_SHARD_DIM[nd] if shard_dim is None else shard_dim, group)
        self.nd = nd
        for attr in self.attrs:
            setattr(self, attr, getattr(conv, attr))


class DomainParallelConv(_ConvFamily):
    """``nn.Conv1d/2d/3d`` over a sharded spatial dim: one halo exchange, then the local conv.

    Exact for any kernel, stride, dilation, padding (int, ``'same'``, ``'valid'``)
    and ``padding_mode`` (``reflect``/``replicate``/``circular`` act at the global
    edges only: the pad along the sharded dim is folded into the halo by
    :func:`fxhalo.ops.conv.padding_edge`; the other dims are padded locally, before
    the exchange, so halo rows arrive padded).  The global output length must split
    over the ranks.  ``shard_dim=None``: :data:`DEFAULT_SHARD_DIM` of the module's
    dimensionality.
    """

    wraps = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    attrs = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
    )

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
        kwargs = dict(axes=domain.kernel_axes(dim))
        padding = self.padding
        if self.padding_mode != "zeros":
            # As torch does: the mode's pad first, then an unpadded conv.
            edge, rest = conv_ops.padding_edge(self.padding_mode, self._reversed_padding_repeated_twice, dim, x.ndim)
            if any(rest):
                x = F.pad(x, rest, mode=self.padding_mode)
            kwargs.update(edge_mode=edge.mode, edge_value=edge.value, edge_extent=edge.extent)
            padding = 0
        return conv_ops.conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, **kwargs)


class DomainParallelConv1d(DomainParallelConv):
    """:class:`DomainParallelConv` for ``nn.Conv1d``; ``shard_dim`` defaults to the length (-1)."""

    wraps = (nn.Conv1d,)

    def __init__(self, conv: nn.Conv1d, shard_dim: int = -1, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConv2d(DomainParallelConv):
    """:class:`DomainParallelConv` for ``nn.Conv2d``; ``shard_dim`` defaults to H (-2)."""

    wraps = (nn.Conv2d,)

    def __init__(self, conv: nn.Conv2d, shard_dim: int = -2, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConv3d(DomainParallelConv):
    """:class:`DomainParallelConv` for ``nn.Conv3d``; ``shard_dim`` defaults to H of ``(B, C, T, H, W)`` (3)."""

    wraps = (nn.Conv3d,)

    def __init__(self, conv: nn.Conv3d, shard_dim: int = 3, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConvTranspose(_ConvFamily):
    """``nn.ConvTranspose1d/2d/3d`` over a sharded spatial dim: halo, local op, crop to this rank's rows."""

    wraps = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    attrs = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "dilation",
        "groups",
        "padding_mode",
    )

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
                    f"{tuple(spatial)} start at {smallest} along one dim (+ at most {s - 1})"
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
        if dim is not None and output_size is not None:  # it names global sizes: compare with the global length
            spatial[dim - (x.ndim - self.nd)] = domain.global_length(x.shape[dim])
        args = (self.stride, self.padding, self._output_padding(spatial, output_size), self.groups, self.dilation)
        if dim is None:
            return _CONV_T[self.nd](x, self.weight, self.bias, *args)
        return conv_transpose_ops.conv_transpose(x, self.weight, self.bias, *args, axes=domain.kernel_axes(dim))


class DomainParallelConvTranspose1d(DomainParallelConvTranspose):
    """:class:`DomainParallelConvTranspose` for ``nn.ConvTranspose1d``; ``shard_dim`` defaults to -1."""

    wraps = (nn.ConvTranspose1d,)

    def __init__(self, conv: nn.ConvTranspose1d, shard_dim: int = -1, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConvTranspose2d(DomainParallelConvTranspose):
    """:class:`DomainParallelConvTranspose` for ``nn.ConvTranspose2d``; ``shard_dim`` defaults to H (-2)."""

    wraps = (nn.ConvTranspose2d,)

    def __init__(self, conv: nn.ConvTranspose2d, shard_dim: int = -2, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelConvTranspose3d(DomainParallelConvTranspose):
    """:class:`DomainParallelConvTranspose` for ``nn.ConvTranspose3d``; ``shard_dim`` defaults to 3."""

    wraps = (nn.ConvTranspose3d,)

    def __init__(self, conv: nn.ConvTranspose3d, shard_dim: int = 3, group=None):
        super().__init__(conv, shard_dim, group)


class DomainParallelPeriodicConv2d(_Wrapper):
    """A weather model's periodic conv: circular pad along W (longitude), reflect along H (poles), unpadded conv.

    Wraps a module with a ``conv`` (``nn.Conv2d``) and a ``padding`` (an int, or
    ``(ph, pw)``) whose forward is ``conv(pad_H(pad_W(x, circular), reflect))``: periodic
    in longitude, reflected at the poles.  ``h_mode``/``w_mode`` name other ``F.pad`` modes
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

    def _spec(self, sdim: int) -> tuple[int, ...]:
        """The ``F.pad`` spec of the periodic pad of spatial dim ``sdim`` (0: H, 1: W)."""
        p = self.padding[sdim]
        return (0, 0, p, p) if sdim == 0 else (p, p, 0, 0)  # torch wants both dims for a 4-D input

    def _pad(self, x, sdim: int):
        """The periodic pad of spatial dim ``sdim`` of ``x``, locally."""
        return F.pad(x, self._spec(sdim), mode=self.modes[sdim]) if self.padding[sdim] else x

    def forward(self, x):
        domain = self.domain()
        dim = None if domain is None else self._sharded_dim(x, domain.dim_of(x.ndim), 2)
        if dim is None:
            return self.conv(self._pad(self._pad(x, 1), 0))
        sdim = dim - (x.ndim - 2)
        x = self._pad(x, 1 - sdim)
        edge, _ = conv_ops.padding_edge(self.modes[sdim], self._spec(sdim), dim, x.ndim)
        c = self.conv
        return conv_ops.conv(
            x,
            c.weight,
            c.bias,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            axes=domain.kernel_axes(dim),
            edge_mode=edge.mode,
            edge_value=edge.value,
            edge_extent=edge.extent,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding={self.padding}, modes(H, W)={self.modes}"


#: spatial dims -> the per-dimensionality class (what convert_to_domain_parallel puts in)
CONVS = {1: DomainParallelConv1d, 2: DomainParallelConv2d, 3: DomainParallelConv3d}
CONV_TRANSPOSES = {1: DomainParallelConvTranspose1d, 2: DomainParallelConvTranspose2d, 3: DomainParallelConvTranspose3d}
