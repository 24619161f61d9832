"""The multi-rank test harness: fxhalo.launch.run_ranks plus the comparison the tests share.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` gloo ranks with a
process-group timeout and a hard deadline (see :mod:`fxhalo.launch`);
``close(got, want)`` applies the project's fp32 tolerances.
"""

from __future__ import annotations

import math

import torch

from fxhalo.launch import run_ranks

__all__ = ["run_ranks", "close"]


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """``(allclose, max abs error)`` with the project's fp32 tolerances."""
    if got is None or want is None:
        return got is None and want is None, 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return False, math.inf
    err = (got.detach().double() - want.detach().double()).abs().max().item() if got.numel() else 0.0
    return torch.allclose(got.detach(), want.detach(), atol=atol, rtol=rtol), err
