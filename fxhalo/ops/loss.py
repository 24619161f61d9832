"""Losses over pixels: each rank sums its per-element loss, and one collective adds the sums.

Every kernel has the signature of its ``torch.nn.functional`` namesake plus
``axes``, and returns the loss replicated on every rank.  The forward is one
``all_reduce`` (:func:`fxhalo.ops.collectives.all_reduce_sum`) of the local sum and,
for ``'mean'``, its denominator (the element count, or a data-dependent one such as
``sum(weight)``); the backward is the ``all_reduce`` that autograd derives from it.
On several mesh axes the sums run over the whole domain (every rank of the axes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domain import ShardAxis, several_axes
from ..mesh import whole_group
from .collectives import all_reduce_sum
from .moments import _acc_dtype
from .reduce import _sum_with_count

__all__ = [
    "legacy_reduction",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "cross_entropy",
    "nll_loss",
]


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


def _finish_loss(pointwise, reduction: str, denominator, group_name: str):
    """Reduce a per-element loss over the whole domain: one all_reduce.

    ``denominator`` is this rank's share of what ``'mean'`` divides by (a tensor:
    summed along with the loss), or ``None`` for the global element count (this
    rank's count, summed along with the loss: shards may differ in length).
    """
    acc = _acc_dtype(pointwise.dtype)
    local = pointwise.sum(dtype=acc)
    if reduction == "sum":
        return all_reduce_sum(local, group_name).to(pointwise.dtype)
    if denominator is None:
        total, count = _sum_with_count(local, pointwise.numel(), group_name)
        return (total / count).to(pointwise.dtype)
    total = all_reduce_sum(torch.stack([local, denominator.to(acc)]), group_name)
    return (total[0] / total[1]).to(pointwise.dtype)


def _elementwise_loss(fn, input, target, reduction, weight, group_name, **options):
    if weight is not None:
        pointwise = fn(input, target, reduction="none", weight=weight, **options)
        return _finish_loss(pointwise, reduction, weight.sum() if reduction == "mean" else None, group_name)
    return _finish_loss(fn(input, target, reduction="none", **options), reduction, None, group_name)


@several_axes
def mse_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    weight=None,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.mse_loss`` over the whole domain ('mean': global sum over global count, or over ``sum(weight)``)."""
    group_name = whole_group(axes)
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.mse_loss, input, target, reduction, weight, group_name)


@several_axes
def l1_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    weight=None,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.l1_loss`` over the whole domain."""
    group_name = whole_group(axes)
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.l1_loss, input, target, reduction, weight, group_name)


@several_axes
def smooth_l1_loss(
    input,
    target,
    size_average=None,
    reduce=None,
    reduction="mean",
    beta=1.0,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.smooth_l1_loss`` over the whole domain."""
    group_name = whole_group(axes)
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _elementwise_loss(F.smooth_l1_loss, input, target, reduction, None, group_name, beta=beta)


@several_axes
def huber_loss(
    input,
    target,
    reduction="mean",
    delta=1.0,
    weight=None,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.huber_loss`` over the whole domain."""
    group_name = whole_group(axes)
    return _elementwise_loss(F.huber_loss, input, target, reduction, weight, group_name, delta=delta)


def _class_denominator(target, weight, ignore_index: int):
    """What ``'mean'`` divides by for class-index targets: the (weighted) count of non-ignored targets."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum()
    return torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()


@several_axes
def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.cross_entropy`` with class dim 1 and spatial targets, over the whole domain.

    ``'mean'`` is ``sum(per-pixel loss) / D`` with ``D`` the sum of the target
    classes' weights over non-ignored pixels (class-index targets) or the pixel
    count (probability targets); checked against torch for weights, ignore_index
    and label smoothing.  ``D`` is summed over ranks in the same all_reduce.
    """
    group_name = whole_group(axes)
    reduction = legacy_reduction(size_average, reduce, reduction)
    pointwise = F.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    probabilities = target.dtype.is_floating_point
    denominator = None if reduction != "mean" or probabilities else _class_denominator(target, weight, ignore_index)
    return _finish_loss(pointwise, reduction, denominator, group_name)


@several_axes
def nll_loss(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    *,
    axes: tuple[ShardAxis, ...],
):
    """``F.nll_loss`` with class dim 1 and spatial targets, over the whole domain."""
    group_name = whole_group(axes)
    reduction = legacy_reduction(size_average, reduce, reduction)
    pointwise = F.nll_loss(input, target, weight, ignore_index=ignore_index, reduction="none")
    denominator = _class_denominator(target, weight, ignore_index) if reduction == "mean" else None
    return _finish_loss(pointwise, reduction, denominator, group_name)
