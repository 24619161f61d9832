"""Scaled dot-product attention: local when the shard sits in a batch dim of q, k and v.

``F.scaled_dot_product_attention(q, k, v, ...)`` mixes tokens along its last two
dims (the sequence and the embedding); every leading dim is a batch dim (batch,
heads, or the windows of a window partition, where the shard lands after Swin- or
CrossFormer-style reshapes).  So the op is local when q, k and v are sharded alike
along one leading dim, and an ``attn_mask`` is either sharded the same way or
replicated with size 1 there.  Attention along a sharded sequence dim needs every
rank's keys and values; it is refused until fxhalo has a sequence-parallel kernel.
"""

from __future__ import annotations

import inspect

from ..layout import Sharded, example_value, sharding_of
from . import LayoutRule, bind, register_op


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
): ...


_SDPA_SIG = inspect.signature(_sdpa_signature)


class AttentionRule(LayoutRule):
    name = "attention"

    def layout(self, node, ctx):
        a = bind(_SDPA_SIG, node)
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        qkv = {"query": q, "key": k, "value": v}
        layouts = {name: sharding_of(t) for name, t in qkv.items()}
        s = next((lay for lay in layouts.values() if lay is not None), None)
        if s is None:
            if sharding_of(mask) is not None:
                ctx.refuse(node, "takes a sharded attn_mask with replicated q, k, v", "shard q, k and v like the mask")
            return None
        ndim = example_value(q).ndim
        if s.dim >= ndim - 2:
            ctx.refuse(
                node,
                f"attends along the sharded dim {s.dim} (its sequence or embedding dim), which needs every "
                "rank's keys and values",
                "shard a batch, head or window dim instead, or gather the tokens first (fxhalo.gather)",
            )
        for name, lay in layouts.items():
            if lay != s or example_value(qkv[name]).ndim != ndim:
                ctx.refuse(
                    node,
                    f"takes {name} laid out as {lay or 'replicated'}, but query as {s}",
                    "shard query, key and value alike, along the same batch dim",
                )
        self._check_mask(node, ctx, mask, s, ndim)
        return s

    @staticmethod
    def _check_mask(node, ctx, mask, s: Sharded, ndim: int) -> None:
        if not hasattr(mask, "meta"):
            return
        sm = sharding_of(mask)
        # The mask broadcasts against (..., L, S) from the right, as the scores do.
        pos = s.dim - ndim
        if sm is not None:
            if sm.dim - example_value(mask).ndim != pos or not sm.same_layout(s):
                ctx.refuse(node, f"takes an attn_mask laid out as {sm}, the scores as {s}", "shard the mask like q")
            return
        shape = example_value(mask).shape
        if len(shape) >= -pos and shape[pos] != 1:
            ctx.refuse(
                node,
                f"broadcasts a replicated attn_mask of shape {tuple(shape)} against the sharded dim",
                "shard the mask like q, or give it size 1 along the sharded dim",
            )


register_op(AttentionRule(), "scaled_dot_product_attention")
