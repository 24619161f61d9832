"""Losses over pixels: the one-device value from one all_reduce.

``reduction='none'`` is local (the per-pixel loss is sharded like the pixels).
``'sum'`` and ``'mean'`` become calls to the kernels of the same name in
:mod:`fxhalo.ops.loss`: each rank sums its per-pixel losses, one all_reduce adds
the sums (and, where ``'mean'`` divides by something data-dependent such as
``sum(weight)`` or the non-ignored pixels, that too), and every rank gets the
global value.

* ``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``: ``input``,
  ``target`` and an element ``weight`` must be sharded alike.
* ``cross_entropy``, ``nll_loss``: class dim 1 (must not be the sharded dim), class
  ``weight`` replicated.  Class-index targets ``[N, *spatial]`` are sharded along
  the input's sharded dim minus one, so with the default ``shard_dim=2`` pass
  ``options={"shard_dim": -2}`` or ``{"input_shard_dims": {"target": 1}}``.
  Probability targets are sharded like the input.

Before::

    mse_loss = torch.nn.functional.mse_loss(l_pred_, l_target_)

After::

    mse_loss = fxhalo.ops.loss.mse_loss(l_pred_, l_target_, None, None, 'mean', None,
                                          axes=(ShardAxis(2, '0', 64),))
"""

from __future__ import annotations

import dataclasses
import inspect

import torch.nn.functional as F

from ..layout import Sharded, example_value, sharding_of
from ..ops import loss as ops
from . import Decision, KernelCall, Rule, bind, register


def _class_dim(x) -> int:
    return 1 if example_value(x).ndim >= 2 else 0


def _per_pixel(s: Sharded, x) -> Sharded:
    """Sharding of a class loss's per-pixel values (the input without its class dim)."""
    return dataclasses.replace(s, dim=s.dim - 1 if s.dim > _class_dim(x) else s.dim)


class Loss(Rule):
    name = "loss"

    def __init__(self, fn, kernel, classes: bool):
        self._sig = inspect.signature(fn)
        self._kernel = kernel
        self._classes = classes

    def decide(self, node, ctx) -> Decision:
        a = bind(self._sig, node)
        x, t, w = a["input"], a["target"], a.get("weight")
        sx, st, sw = sharding_of(x), sharding_of(t), sharding_of(w)
        if sx is None and st is None and sw is None:
            return Decision()
        if sx is None:
            ctx.refuse(
                node, "compares a replicated input with a sharded target", "shard both (or neither) of input and target"
            )
        pointwise = self._check(node, a, sx, st, sw, ctx)
        reduction = ops.legacy_reduction(a.get("size_average"), a.get("reduce"), a["reduction"])
        if reduction == "none":
            return Decision(pointwise)
        return Decision(None, self.kernel_call, sx)  # one sum over the ranks; the loss is replicated

    def kernel_call(self, node) -> KernelCall:
        return KernelCall(self._kernel, tuple(bind(self._sig, node).values()), {})

    def _check(self, node, a, sx, st, sw, ctx) -> Sharded:
        """Refuse layouts whose rows would not line up; returns the per-element loss's sharding."""
        x, t = a["input"], a["target"]
        if not self._classes:
            if st != sx or example_value(t).shape != example_value(x).shape:
                ctx.refuse(
                    node,
                    f"compares input {sx} with target {st or 'replicated'} of another layout or shape",
                    "give input and target the same shape and sharding",
                )
            if a.get("weight") is not None and sw != sx:
                ctx.refuse(
                    node, f"weights elements with a {sw or 'replicated'} weight", "shard the weight like the input"
                )
            return sx
        if sx.dim == _class_dim(x):
            ctx.refuse(node, "spreads the class dim over the ranks", "shard a spatial dim instead")
        if sw is not None:
            ctx.refuse(node, "takes a sharded class weight", "pass a replicated class weight")
        probabilities = example_value(t).dtype.is_floating_point
        want = sx if probabilities else _per_pixel(sx, x)
        if st != want:
            ctx.refuse(
                node,
                f"takes a target sharded as {st or 'replicated'}, but its pixels are sharded as {want}",
                "shard the target along the same pixel dim: with class-index targets [N, H, W] and "
                "shard_dim=2, pass options={'shard_dim': -2} or {'input_shard_dims': {'target': 1}}",
            )
        return _per_pixel(sx, x)


register(Loss(F.mse_loss, ops.mse_loss, False), F.mse_loss)
register(Loss(F.l1_loss, ops.l1_loss, False), F.l1_loss)
register(Loss(F.smooth_l1_loss, ops.smooth_l1_loss, False), F.smooth_l1_loss)
register(Loss(F.huber_loss, ops.huber_loss, False), F.huber_loss)
register(Loss(F.cross_entropy, ops.cross_entropy, True), F.cross_entropy)
register(Loss(F.nll_loss, ops.nll_loss, True), F.nll_loss)
