"""``validate_sharding_constraints``: CREDIT's check of a model's strides and windows against a local length."""

from __future__ import annotations

import torch.nn as nn

from . import nn as dp
from .nn.base import batched_spatial_index
from .ops.rows import ints

__all__ = ["validate_sharding_constraints"]


def _nd_of(module) -> int | None:
    """Spatial dims of a strided layer (conv, transposed conv, max/avg pool), else None."""
    if isinstance(module, (nn.modules.conv._ConvNd, dp.DomainParallelConv, dp.DomainParallelConvTranspose)):
        return len(module.kernel_size)
    if isinstance(module, dp.DomainParallelPool):
        return module.nd if module.kind in ("max", "avg") else None
    for t, (kind, nd) in dp.POOLS.items():
        if isinstance(module, t):
            return nd if kind in ("max", "avg") else None
    return None


def _resampling(module, shard_dim: int) -> tuple[str, int] | None:
    """``("down" | "up", factor)`` of a layer that resamples the sharded dim by an integer factor."""
    if isinstance(module, nn.PixelUnshuffle):
        return "down", module.downscale_factor
    if isinstance(module, nn.PixelShuffle):
        return "up", module.upscale_factor
    if isinstance(module, (nn.Upsample, dp.DomainParallelInterpolate)):
        sf = module.scale_factor
        if isinstance(sf, tuple):
            sdim = batched_spatial_index(shard_dim, len(sf))
            sf = sf[sdim] if isinstance(sdim, int) else None
        if sf is None or sf <= 0:
            return None
        if sf > 1 and float(sf).is_integer():
            return "up", int(sf)
        if sf < 1 and float(1 / sf).is_integer():
            return "down", int(1 / sf)
        return None
    nd = _nd_of(module)
    sdim = None if nd is None else batched_spatial_index(shard_dim, nd)
    if not isinstance(sdim, int):
        return None
    stride = ints(module.stride, nd)[sdim]
    if stride == 1:
        return None
    transposed = isinstance(module, (nn.modules.conv._ConvTransposeNd, dp.DomainParallelConvTranspose))
    return ("up" if transposed else "down"), stride


def _window(module) -> int | None:
    ws = getattr(module, "window_size", None)
    if isinstance(ws, int):
        return ws
    if isinstance(ws, (tuple, list)) and ws and all(isinstance(v, int) for v in ws):
        return ws[-2] if len(ws) >= 2 else ws[0]  # (..., H, W): the H entry
    return None


def validate_sharding_constraints(
    model: nn.Module, local_h: int, window_sizes=None, *, shard_dim: int = -2
) -> list[str]:
    """Check that a local length ``local_h`` along the sharded dim suits ``model`` at every level.

    Walks the modules in registration order, following the local length through
    every layer that resamples the sharded dim by an integer factor (strided convs
    and pools, transposed convs, pixel (un)shuffle, ``nn.Upsample``).  A level is
    the length between two such layers.  Reports, as messages:

    * a stride that does not divide the local length it meets;
    * a window size (``window_sizes[i]`` for the ``i``-th downsampling level, or,
      when ``window_sizes`` is None, the ``window_size`` attribute of any module)
      that does not divide the local length of its level.

    Returns the messages, empty when every check passes.  This is the arithmetic
    of the layers alone; :func:`fxhalo.validate` traces the model and finds every
    problem of a given input (including ops in ``forward`` code).
    """
    messages: list[str] = []
    h = int(local_h)
    levels = [h]  # local length at each downsampling depth, in order of first visit
    depth = 0
    for path, module in model.named_modules():
        where = path or "<model>"
        step = _resampling(module, shard_dim)
        if step is not None:
            kind, f = step
            if kind == "down":
                if h % f:
                    messages.append(
                        f"{where} ({type(module).__name__}): stride {f} does not divide the local "
                        f"length {h} at level {depth}; ranks would disagree on the rows they own"
                    )
                h //= f
                depth += 1
                if depth == len(levels):
                    levels.append(h)
            else:
                h *= f
                depth = max(depth - 1, 0)
            continue
        ws = _window(module) if window_sizes is None else None
        if ws is not None and h % ws:
            messages.append(
                f"{where} ({type(module).__name__}): window size {ws} does not divide the local "
                f"length {h} at level {depth}"
            )
    if window_sizes is not None:
        for i, ws in enumerate(window_sizes):
            if i >= len(levels):
                messages.append(
                    f"window_sizes[{i}] = {ws}: the model has only {len(levels)} levels (local lengths {levels})"
                )
            elif levels[i] % int(ws):
                messages.append(f"level {i}: window size {ws} does not divide the local length {levels[i]}")
    if min(levels) < 1:
        messages.append(f"the local length {local_h} falls below one row at depth (lengths {levels})")
    return messages
