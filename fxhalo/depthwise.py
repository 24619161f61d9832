"""Depthwise convolutions with shared weights and context-parallel channel slicing.

The API of the Hyena-style ``DistributedDepthwiseConv1d`` / ``DistributedDepthwiseConv2d``
(shared/seeds 000 and 001): a compact weight of ``G`` prototype filters is expanded
to the ``C`` channels with ``repeat_interleave`` (channel ``c`` uses filter
``c // (C/G)``), and ``forward(x, cp_group)`` keeps this rank's block of ``C/P``
channels when the channels are split over a context-parallel group.

fxhalo adds one thing: ``domain_group`` (keyword-only, off by default) shards a
*spatial* dim instead, e.g. the sequence of a long causal conv.  The conv then runs
through :func:`fxhalo.ops.conv.conv`, the kernel of the compiled path, with a halo
of ``K-1`` rows from the left neighbour for a causal conv (``'same'`` padding takes
rows from both).  Both may be combined: channels sliced over ``cp_group``, a
spatial dim sharded over ``domain_group``.

Gradients follow fxhalo's convention: each rank's weight gradient is partial.
Sum it over the domain group and over the context-parallel group (a rank's
gradient holds only the filters of its channel block).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .domain import Domain, resolve_group
from .errors import FxHaloError
from .nn.base import _domain, group_name_of
from .ops import conv as conv_ops

__all__ = ["DistributedDepthwiseConv1d", "DistributedDepthwiseConv2d"]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _DepthwiseConv(nn.Module):
    nd = 1

    def __init__(
        self,
        hidden_dim: int,
        kernel_size: tuple[int, ...],
        num_groups,
        bias: bool,
        dtype,
        device,
        domain_group,
        shard_dim: int,
    ):
        super().__init__()
        hidden_dim = int(hidden_dim)
        num_groups = hidden_dim if num_groups is None else int(num_groups)
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}")
        if any(k < 1 for k in kernel_size):
            raise ValueError(f"kernel_size must be positive, got {kernel_size}")
        if not 1 <= num_groups <= hidden_dim or hidden_dim % num_groups:
            raise ValueError(
                f"num_groups={num_groups} must divide hidden_dim={hidden_dim} "
                "(each prototype filter serves hidden_dim // num_groups channels)"
            )
        factory = {"dtype": dtype or torch.float32, "device": device if device is not None else _default_device()}
        self.hidden_dim = hidden_dim
        self.num_groups = num_groups
        self.group_dim = hidden_dim // num_groups
        self.weight = nn.Parameter(torch.empty(num_groups, *kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_groups, **factory)) if bias else None
        # Off unless a domain group is given (the seeds' modules are single-device);
        # fxhalo.convert_to_domain_parallel switches it on, possibly with WORLD (None).
        self.domain_parallel = domain_group is not None
        self.domain_group_name = group_name_of(domain_group)
        self.shard_dim = int(shard_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Weight and bias ~ U(-b, b) with ``b = sqrt(1 / prod(kernel_size))`` (one input channel per filter)."""
        bound = math.sqrt(1.0 / math.prod(self.weight.shape[1:]))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _channel_block(self, cp_group) -> tuple[int, int]:
        """``(first channel, channel count)`` of this rank's block: all channels without a CP group."""
        if cp_group is None:
            return 0, self.hidden_dim
        pg = resolve_group(cp_group)
        size, rank = dist.get_world_size(pg), dist.get_rank(pg)
        if self.hidden_dim % size:
            raise FxHaloError(
                f"{type(self).__name__}: hidden_dim={self.hidden_dim} does not split over the "
                f"{size} ranks of the context-parallel group; choose a multiple of {size}"
            )
        block = self.hidden_dim // size
        return rank * block, block

    def _domain(self) -> Domain | None:
        return _domain(self.domain_group_name, self.shard_dim) if self.domain_parallel else None

    def _padding(self):
        """``(conv padding, (lo, hi) zero rows before the conv along each spatial dim or None)``."""
        return "same", None

    def forward(self, x: torch.Tensor, cp_group=None) -> torch.Tensor:
        if x.ndim != self.nd + 2:
            raise AssertionError(
                f"{type(self).__name__} expects a {self.nd + 2}-D input [B, C, ...], got shape {tuple(x.shape)}"
            )
        start, count = self._channel_block(cp_group)
        if x.shape[1] != count:
            raise FxHaloError(
                f"{type(self).__name__}: input has {x.shape[1]} channels, expected {count} "
                f"(hidden_dim={self.hidden_dim}"
                + (" split over the context-parallel group)" if cp_group is not None else ")")
            )
        # Expand the G prototypes to C channels, then keep this rank's block.
        weight = self.weight.repeat_interleave(self.group_dim, 0)[start : start + count].unsqueeze(1)
        bias = None if self.bias is None else self.bias.repeat_interleave(self.group_dim, 0)[start : start + count]
        padding, zeros = self._padding()
        domain = self._domain()
        if domain is None:
            if zeros is not None:
                x = F.pad(x, [p for lo_hi in reversed(zeros) for p in lo_hi])
            return (F.conv1d if self.nd == 1 else F.conv2d)(x, weight, bias, 1, padding, 1, count)
        dim = domain.dim_of(x.ndim)
        if dim < 2:
            raise FxHaloError(
                f"{type(self).__name__}: shard_dim={self.shard_dim} names dim {dim} of "
                f"{tuple(x.shape)}; the domain group shards a spatial dim (slice channels "
                "with cp_group instead)"
            )
        kwargs = {}
        if zeros is not None:
            sdim = dim - 2
            rest = [(0, 0) if i == sdim else lo_hi for i, lo_hi in enumerate(zeros)]
            if any(p for lo_hi in rest for p in lo_hi):
                x = F.pad(x, [p for lo_hi in reversed(rest) for p in lo_hi])
            kwargs = dict(edge_mode="zeros", edge_extent=zeros[sdim])  # the causal pad, at the global start only
        return conv_ops.conv(x, weight, bias, 1, padding, 1, count, axes=domain.kernel_axes(dim), **kwargs)


class DistributedDepthwiseConv1d(_DepthwiseConv):
    """1-D depthwise conv over ``[B, C_local, L]`` with ``G`` shared filters of length ``K``.

    ``causal=True`` pads ``K-1`` zeros on the left only (output ``t`` sees inputs
    ``<= t``); otherwise ``padding='same'`` (for an even ``K`` torch puts the extra
    zero on the right).  ``weight`` is ``[G, K]``, ``bias`` ``[G]`` or None;
    ``num_groups=None`` means ``G = C``.  ``device`` defaults to the current CUDA
    device when there is one, else the CPU; ``dtype`` to float32.

    ``forward(x, cp_group=None)``: with a context-parallel group of ``P`` ranks, rank
    ``r`` convolves channels ``[r*C/P, (r+1)*C/P)`` and ``x`` must hold exactly those.
    Raises AssertionError for a non-3-D input and RuntimeError
    (:class:`~fxhalo.errors.FxHaloError`) for a channel-count mismatch or ``C % P != 0``.

    ``domain_group`` / ``shard_dim`` (fxhalo's addition, keyword-only): shard the
    length over a domain group; causal convs then take ``K-1`` halo rows from the left.
    """

    nd = 1

    def __init__(
        self,
        hidden_dim: int,
        kernel_size: int,
        causal: bool = False,
        num_groups: int | None = None,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
        *,
        domain_group=None,
        shard_dim: int = -1,
    ):
        super().__init__(hidden_dim, (int(kernel_size),), num_groups, bias, dtype, device, domain_group, shard_dim)
        self.causal = bool(causal)
        self.kernel_size = int(kernel_size)

    def _padding(self):
        if self.causal:
            return 0, ((self.kernel_size - 1, 0),)
        return "same", None

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, kernel_size={self.kernel_size}, causal={self.causal}, "
            f"num_groups={self.num_groups}, bias={self.bias is not None}"
        )


class DistributedDepthwiseConv2d(_DepthwiseConv):
    """2-D depthwise conv over ``[B, C_local, H, W]`` with ``G`` shared ``Kh x Kw`` filters, ``padding='same'``.

    ``weight`` is ``[G, Kh, Kw]``, ``bias`` ``[G]`` or None; an int ``kernel_size``
    means ``(K, K)``.  ``forward(x, cp_group=None)`` slices channels as
    :class:`DistributedDepthwiseConv1d` does and raises the same errors (for a
    non-4-D input, AssertionError).

    ``domain_group`` / ``shard_dim`` (keyword-only, default H): shard a spatial dim
    over a domain group, with a halo from both neighbours.
    """

    nd = 2

    def __init__(
        self,
        hidden_dim: int,
        kernel_size,
        num_groups: int | None = None,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
        *,
        domain_group=None,
        shard_dim: int = -2,
    ):
        k = (int(kernel_size),) * 2 if isinstance(kernel_size, int) else tuple(int(v) for v in kernel_size)
        if len(k) != 2:
            raise ValueError(f"kernel_size must be an int or a pair, got {kernel_size}")
        super().__init__(hidden_dim, k, num_groups, bias, dtype, device, domain_group, shard_dim)
        self.kernel_size = k

    def extra_repr(self) -> str:
        return (
            f"hidden_dim={self.hidden_dim}, kernel_size={self.kernel_size}, num_groups={self.num_groups}, "
            f"bias={self.bias is not None}"
        )
