"""Transposed convolutions along the sharded dim (kernel :func:`fxhalo.ops.conv_transpose.conv_transpose`).

``nn.ConvTranspose*d`` and ``F.conv_transpose*d`` both reach the graph as the
builtins ``torch.conv_transpose{1,2,3}d``.  The planner derives each rank's input
rows from the geometry; a transposed conv whose every rank's output rows come from
its own input rows and line up with the local op's (kernel equal to the stride, no
padding: the inverse of a patchify conv) is proven local and left untouched.
"""

from __future__ import annotations

import inspect

import torch

from ..layout import example_value
from ..ops import conv_transpose as ct_ops
from ..ops.rows import ints, spatial_index
from . import register
from .resample import Resampled, ResampleRule, domain_for, require_contiguous, resized, static_or_refuse


def _conv_transpose_signature(
    input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
): ...


class ConvTransposeRule(ResampleRule):
    name = "conv_transpose"
    signature = inspect.signature(_conv_transpose_signature)
    replicated = ("weight", "bias")

    def plan(self, node, ctx, args, s):
        static_or_refuse(
            node,
            ctx,
            stride=args["stride"],
            padding=args["padding"],
            output_padding=args["output_padding"],
            dilation=args["dilation"],
        )
        ndim = example_value(args["input"]).ndim
        w_shape = tuple(example_value(args["weight"]).shape)
        nd = len(w_shape) - 2
        sdim = spatial_index(ndim, nd, s.dim)
        if sdim is None:
            if s.dim == ndim - nd - 1:
                ctx.refuse(
                    node,
                    f"mixes the channels of a tensor sharded along dim {s.dim}",
                    "shard a spatial dim (e.g. shard_dim=2) instead of the channel dim",
                )
            return Resampled(s)  # sharded over the batch: each sample is local
        require_contiguous(node, ctx, s)
        k = w_shape[2:]
        st, p = ints(args["stride"], nd), ints(args["padding"], nd)
        op, d = ints(args["output_padding"], nd), ints(args["dilation"], nd)
        plan = ct_ops.plan_conv_transpose(
            ct_ops.TransposedDim(k[sdim], st[sdim], p[sdim], op[sdim], d[sdim]),
            domain_for(ctx, s),
            s.global_length,
            f"conv_transpose{nd}d (kernel {k}, stride {st}, padding {p}, output_padding {op})",
        )
        out = resized(s, plan.m, ctx)
        if plan.local:
            return Resampled(out)
        call = tuple(args[name] for name in self.signature.parameters)
        return Resampled(out, ct_ops.conv_transpose, call)


register(ConvTransposeRule(), torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)
