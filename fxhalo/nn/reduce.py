"""Softmax and log-softmax along the sharded dim: a global max and sum (one all_gather)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..ops import reduce as reduce_ops
from .base import _Wrapper


class DomainParallelSoftmax(_Wrapper):
    """``nn.Softmax`` / ``nn.LogSoftmax``: along the sharded dim, each rank's (max, sum of exp) per row
    travel in one all_gather (:func:`fxhalo.ops.reduce.softmax`); along any other dim, the local op.

    The output is sharded like the input; its backward is exact (autograd through the
    collective), as for the compiled rule of ``F.softmax``.
    """

    wraps = (nn.Softmax, nn.LogSoftmax)

    def __init__(self, softmax, shard_dim: int = -2, group=None):
        super().__init__(softmax, shard_dim, group)
        self.dim = softmax.dim
        self.log = isinstance(softmax, nn.LogSoftmax)

    def _dim(self, ndim: int) -> int:
        dim = self.dim
        if dim is None:  # torch's legacy implicit choice
            dim = 0 if ndim in (0, 1, 3) else 1
        return dim + ndim if dim < 0 else dim

    def forward(self, x):
        domain = self.domain()
        if domain is None or self._dim(x.ndim) != domain.dim_of(x.ndim):
            return (F.log_softmax if self.log else F.softmax)(x, self.dim, _stacklevel=5)
        kernel = reduce_ops.log_softmax if self.log else reduce_ops.softmax
        return kernel(x, self._dim(x.ndim), axes=domain.kernel_axes(domain.dim_of(x.ndim)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}"
