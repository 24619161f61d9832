"""Row bookkeeping shared by the resampling kernels (pooling, transposed conv, interpolation).

Every resampling op along the sharded dim is planned the same way:

1. the *global* output length ``M`` follows from the op's geometry and the global input
   length ``N``; both are split by the domain's partition rule, so rank ``r`` owns input
   rows ``[a, b)`` and output rows ``[c, e)``;
2. the op says which global input rows each rank's output rows read (the *needs*);
3. one :func:`~fxhalo.halo.halo_exchange` builds each rank's slab of those rows;
4. the local op runs on the slab and yields exactly rows ``[c, e)``.

This module holds the pieces of that recipe that do not depend on the op; step 1
(:func:`fxhalo.geometry.split_rows`) is shared with the convolutions.
"""

from __future__ import annotations

import torch

from ..halo import Edge, HaloPlan, plan_halo

_ZERO_EDGE = Edge()  # frozen: safe to share as a default

__all__ = ["ints", "spatial_index", "halo_plan", "covers_only_own_rows", "along", "ceil_div"]


def ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def ints(value, n: int) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as an ``n``-tuple, the way torch expands its arguments."""
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) == 1 and n > 1:
            return (int(value[0]),) * n
        return tuple(int(v) for v in value)
    return (int(value),) * n


def spatial_index(ndim: int, nd: int, dim: int) -> int | None:
    """Which of an ``nd``-D op's spatial axes tensor dim ``dim`` is, or ``None`` for a batch/channel dim.

    The spatial axes are the last ``nd`` dims, whether or not the input has a batch dim.
    """
    sdim = dim - (ndim - nd)
    return sdim if sdim >= 0 else None


def halo_plan(in_part, needs, rank: int, edge: Edge = _ZERO_EDGE) -> HaloPlan:
    """The exchange that gives every rank its needed rows (empty ranges allowed)."""
    needs = tuple((s, max(s, e)) for s, e in needs)
    return plan_halo(tuple(in_part), needs, rank, edge)


def covers_only_own_rows(in_part, needs, n: int) -> bool:
    """True when every rank's needed rows that lie inside the tensor are its own rows."""
    for (a, b), (s, e) in zip(in_part, needs):
        s, e = max(s, 0), min(e, n)
        if s < e and (s < a or e > b):
            return False
    return True


def along(values, dim: int, ndim: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A constant 1-D ``values`` shaped to broadcast along ``dim`` of an ``ndim``-D tensor like ``like``."""
    shape = [1] * ndim
    shape[dim] = len(values)
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device).view(shape)
