"""Eager domain-parallel layers: thin modules around the kernels of :mod:`fxhalo.ops`.

For users who do not compile.  Each wrapper takes the ``torch.nn`` module it
replaces, the sharded tensor dim and the process group, and its ``forward`` calls
the *same* functional kernel the ``domain_parallel`` graph rewrite inserts (one
implementation of each op).  ``fxhalo.convert_to_domain_parallel`` puts them into
a model.  One wrapper class per op family, its dimensionality read from the
wrapped module: :class:`DomainParallelConv`, :class:`DomainParallelConvTranspose`,
:class:`DomainParallelGroupNorm`, :class:`DomainParallelInstanceNorm`,
:class:`DomainParallelBatchNorm`, :class:`DomainParallelLayerNorm`, :class:`DomainParallelPool`,
:class:`DomainParallelSoftmax`, :class:`DomainParallelInterpolate` (and
:class:`DomainParallelPeriodicConv2d` for a pad-and-conv module).
``DomainParallelConv1d/2d/3d`` and ``DomainParallelConvTranspose1d/2d/3d`` are the
conv families narrowed to one dimensionality.

**The shard_dim convention** (every wrapper, and ``convert_to_domain_parallel``):
``shard_dim`` is a dim of the layer's *input tensor*, as ``forward`` gets it;
negative dims count from the end (``-2`` is H of ``(B, C, H, W)`` and of
``(B, C, T, H, W)``), non-negative ones from the first dim.  A negative
``shard_dim`` names the same dim of a batched and an unbatched input, and of 1-D,
2-D and 3-D layers' inputs alike, so prefer it.  (``convert_to_domain_parallel``,
which never sees a tensor, reads a non-negative ``shard_dim`` on the batched input
``(N, C, *spatial)``.)  Defaults: H, i.e. ``-2``, for every 2-D layer and every
family class; the 1-D convs default to the length (``-1``), the 3-D convs to ``3``
(H of ``(B, C, T, H, W)``, the latitude of a weather model's 3-D input), which is ``-2`` for a batched
input.

Three guarantees every wrapper keeps:

* **One device's answer.**  On a slab of the global input, the forward gives this
  rank's rows of the wrapped module's output on the gathered tensor, and the
  backward gives this rank's rows of the input gradient.  Parameter gradients are
  *partial*: summed over the domain group they are one device's (the convention of
  the compiled path; :func:`reduce_gradients` does the sum).  A global pool's output
  is replicated (see :class:`DomainParallelPool`).
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

import torch.nn as nn

from ..depthwise import DistributedDepthwiseConv1d, DistributedDepthwiseConv2d  # the seed modules, also top-level
from .base import _Wrapper, group_name_of, reduce_gradients
from .conv import (
    CONV_TRANSPOSES,
    CONVS,
    DEFAULT_SHARD_DIM,
    DomainParallelConv,
    DomainParallelConv1d,
    DomainParallelConv2d,
    DomainParallelConv3d,
    DomainParallelConvTranspose,
    DomainParallelConvTranspose1d,
    DomainParallelConvTranspose2d,
    DomainParallelConvTranspose3d,
    DomainParallelPeriodicConv2d,
)
from .norm import (
    DomainParallelBatchNorm,
    DomainParallelGroupNorm,
    DomainParallelInstanceNorm,
    DomainParallelLayerNorm,
)
from .reduce import DomainParallelSoftmax
from .resample import POOLS, DomainParallelInterpolate, DomainParallelPool

__all__ = [
    "DomainParallelConv",
    "DomainParallelConv1d",
    "DomainParallelConv2d",
    "DomainParallelConv3d",
    "DomainParallelConvTranspose",
    "DomainParallelConvTranspose1d",
    "DomainParallelConvTranspose2d",
    "DomainParallelConvTranspose3d",
    "DomainParallelGroupNorm",
    "DomainParallelInstanceNorm",
    "DomainParallelBatchNorm",
    "DomainParallelLayerNorm",
    "DomainParallelPeriodicConv2d",
    "DomainParallelInterpolate",
    "DomainParallelPool",
    "DomainParallelSoftmax",
    "DistributedDepthwiseConv1d",
    "DistributedDepthwiseConv2d",
    "DEFAULT_SHARD_DIM",
    "WRAPPERS",
    "POOLS",
    "group_name_of",
    "reduce_gradients",
]

# The classes keep the module path they had when fxhalo.nn was one file (reprs, pickles).
for _cls in (_Wrapper, *(v for k, v in list(globals().items()) if k.startswith("DomainParallel"))):
    _cls.__module__ = __name__

#: torch.nn type -> the wrapper that replaces it (what convert_to_domain_parallel uses)
WRAPPERS: dict[type, type] = {
    **{t: CONVS[nd] for nd, t in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d))},
    **{t: CONV_TRANSPOSES[nd] for nd, t in ((1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d))},
    nn.GroupNorm: DomainParallelGroupNorm,
    **{t: DomainParallelInstanceNorm for t in DomainParallelInstanceNorm.wraps},
    **{t: DomainParallelBatchNorm for t in DomainParallelBatchNorm.wraps},
    **{t: DomainParallelLayerNorm for t in DomainParallelLayerNorm.wraps},
    **{t: DomainParallelPool for t in POOLS},
    **{t: DomainParallelSoftmax for t in DomainParallelSoftmax.wraps},
}
