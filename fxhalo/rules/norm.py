"""Normalisation: local when its statistics leave out the sharded dim, else one all_reduce.

Which dims each op's statistics span (``x`` is ``[N, C, *spatial]``):

=====================================  ==============================================
op                                     statistics over
=====================================  ==============================================
``F.group_norm``                       channels of a group and every spatial dim
``F.instance_norm`` (input stats)      every spatial dim
``F.batch_norm`` (``training=True``)   the batch and every spatial dim
``F.layer_norm``, ``F.rms_norm``       the last ``len(normalized_shape)`` dims
eval-mode batch / instance norm        nothing: running statistics, local
=====================================  ==============================================

When the sharded dim is among them, the node becomes a call to the kernel of the
same name in :mod:`fxhalo.ops.norm` (one all_reduce); otherwise it stays as it is.
The output is sharded like the input either way.

Before::

    group_norm = torch.nn.functional.group_norm(l_x_, 2, l_weight_, l_bias_, 1e-05)

After::

    group_norm = fxhalo.ops.norm.group_norm(l_x_, 2, l_weight_, l_bias_, 1e-05, axes=(ShardAxis(2, '0', 64),))
"""

from __future__ import annotations

import dataclasses
import inspect

import torch.nn.functional as F

from ..layout import Sharded, example_value, sharding_of
from ..ops import norm as ops
from . import Decision, KernelCall, Rule, bind, register, register_op

_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _group_norm_dims(a, ndim):
    return tuple(range(1, ndim))


def _instance_norm_dims(a, ndim):
    return tuple(range(2, ndim)) if a["use_input_stats"] else ()


def _batch_norm_dims(a, ndim):
    return (0,) + tuple(range(2, ndim)) if a["training"] else ()


def _layer_norm_dims(a, ndim):
    return tuple(range(ndim - len(a["normalized_shape"]), ndim))


class Norm(Rule):
    name = "norm"

    def __init__(self, fn, kernel, stats_dims, flag: str | None = None, affine_normalized: bool = False):
        self._sig = inspect.signature(fn)
        self._kernel = kernel
        self._stats_dims = stats_dims  # (bound args, ndim) -> the dims the statistics span
        self._flag = flag  # the argument that switches input statistics on, if any
        # weight and bias have the normalised shape (layer and RMS norm), not one value per channel
        self._affine_normalized = affine_normalized

    @property
    def affine_normalized(self) -> bool:
        """Weight and bias have the normalised shape (layer and RMS norm), not one value per channel."""
        return self._affine_normalized

    def bound(self, node) -> dict:
        """The node's arguments by the op's parameter names."""
        return bind(self._sig, node)

    def decide(self, node, ctx) -> Decision:
        a = bind(self._sig, node)
        s = sharding_of(a["input"])
        params = {p: a[p] for p in _PARAMS if a.get(p) is not None}
        if s is None:
            if any(sharding_of(v) is not None for v in params.values()):
                ctx.refuse(node, "normalises a replicated tensor with sharded parameters", "pass replicated parameters")
            return Decision()
        if self._flag is not None and not isinstance(a[self._flag], bool):
            ctx.refuse(node, f"takes a non-constant '{self._flag}'", f"pass {self._flag} as a Python bool")
        ndim = example_value(a["input"]).ndim
        dims = self._stats_dims(a, ndim)
        crosses = s.dim in dims
        if crosses and self._kernel is ops.group_norm and s.dim == 1:
            ctx.refuse(
                node,
                "normalises groups of a tensor sharded along its channel dim",
                "shard a spatial dim (e.g. shard_dim=2) instead",
            )
        self._check_params(node, params, s, ndim, crosses, ctx)
        return Decision(s, self.kernel_call if crosses else None, s)

    def kernel_call(self, node) -> KernelCall:
        return KernelCall(self._kernel, tuple(bind(self._sig, node).values()), {})

    def _check_params(self, node, params, s: Sharded, ndim: int, crosses: bool, ctx):
        for name, p in params.items():
            sp = sharding_of(p)
            if self._affine_normalized and name in ("weight", "bias") and crosses:
                # The affine parameters have the normalised shape, which includes the sharded dim:
                # each rank must apply its own rows of them.
                want = dataclasses.replace(s, dim=s.dim - (ndim - example_value(p).ndim))
                if sp != want:
                    layout = "replicated" if sp is None else f"differently sharded ({sp})"
                    ctx.refuse(
                        node,
                        f"normalises over the sharded dim {s.dim} with a {layout} {name} of shape "
                        f"{tuple(example_value(p).shape)}, whose rows would not line up with this rank's rows",
                        "use elementwise_affine=False and apply the weight yourself from a tensor sharded "
                        "like the input, or pass a sharded weight to F.layer_norm",
                    )
            elif sp is not None:
                ctx.refuse(node, f"takes a sharded {name}", f"pass a replicated {name}")


register(Norm(F.group_norm, ops.group_norm, _group_norm_dims), F.group_norm)
register(Norm(F.instance_norm, ops.instance_norm, _instance_norm_dims, "use_input_stats"), F.instance_norm)
register(Norm(F.batch_norm, ops.batch_norm, _batch_norm_dims, "training"), F.batch_norm)
register(Norm(F.layer_norm, ops.layer_norm, _layer_norm_dims, affine_normalized=True), F.layer_norm)
register_op(Norm(F.rms_norm, ops.rms_norm, _layer_norm_dims, affine_normalized=True), "rms_norm")
