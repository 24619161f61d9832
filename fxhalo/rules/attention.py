"""Scaled dot-product attention: local over a sharded batch dim, a kernel over a sharded sequence.

``F.scaled_dot_product_attention(q, k, v, ...)`` mixes tokens along its last two
dims (the sequence and the embedding); every leading dim is a batch dim (batch,
heads, or the windows of a window partition, where the shard lands after Swin- or
CrossFormer-style reshapes).  So the op is local when q, k and v are sharded alike
along one leading dim, and an ``attn_mask`` is either sharded the same way or
replicated with size 1 there.

With the **sequence** dim of q sharded (the H*W tokens of an image), every query
needs every key: :mod:`fxhalo.ops.attention` moves the shard to the heads and back
when there are at least as many heads as ranks (with ``enable_gqa``: when both head
counts divide by the rank count), and otherwise gathers the keys and values.  Keys
and values must be sharded like the queries, or whole (replicated); an ``attn_mask``
sharded like the queries or of size 1 along the query dim.  ``dropout_p`` other than
0 is refused there (which scores drop would depend on the rank count).  A sharded
embedding dim is refused.
"""

from __future__ import annotations

import inspect

from ..layout import Sharded, example_value, sharding_of
from ..ops import attention as attention_ops
from . import Decision, KernelCall, Rule, bind, register_op
from .resample import require_contiguous


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
): ...


_SDPA_SIG = inspect.signature(_sdpa_signature)


class AttentionRule(Rule):
    name = "attention"

    def decide(self, node, ctx) -> Decision:
        a = bind(_SDPA_SIG, node)
        q = a["query"]
        ndim = example_value(q).ndim
        s = next((lay for lay in map(sharding_of, (q, a["key"], a["value"])) if lay is not None), None)
        if s is not None and s.dim == ndim - 2:
            return self._sequence(node, ctx, a, s, ndim)
        return Decision(self.layout(node, ctx))

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
        if s.dim >= ndim - 1:
            ctx.refuse(
                node,
                f"attends with the embedding dim {s.dim} sharded, which every score sums over",
                "shard the sequence, a batch, head or window dim instead",
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

    def _sequence(self, node, ctx, a, s: Sharded, ndim: int) -> Decision:
        """q's sequence dim sharded: the heads kernel when the heads go round, else gathered keys."""
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        sq, sk, sv = sharding_of(q), sharding_of(k), sharding_of(v)
        if sq != s:
            ctx.refuse(node, f"takes replicated queries with keys laid out as {s}", "shard the queries like the keys")
        require_contiguous(node, ctx, s)
        dropout = a["dropout_p"]
        if not isinstance(dropout, (int, float)) or dropout != 0:
            ctx.refuse(
                node,
                f"applies dropout (dropout_p={dropout}) to attention over the sharded sequence: which scores "
                "drop would depend on the rank count",
                "use dropout_p=0.0 (model.eval(), or a module option), or drop out the output instead",
            )
        kv_sharded = sk is not None or sv is not None
        for name, lay, t in (("key", sk, k), ("value", sv, v)):
            if kv_sharded and (lay is None or lay.dim != example_value(t).ndim - 2 or not lay.same_layout(s)):
                ctx.refuse(
                    node,
                    f"takes {name} laid out as {lay or 'replicated'}, the queries as {s}",
                    "shard query, key and value alike along the sequence, or give key and value whole",
                )
        ms, mask_shard = sharding_of(mask), None
        if ms is not None:
            mask_shard = {example_value(mask).ndim - 2: "queries", example_value(mask).ndim - 1: "keys"}.get(ms.dim)
            if mask_shard is None or not ms.same_layout(s):
                ctx.refuse(
                    node,
                    f"takes an attn_mask laid out as {ms}, the queries as {s}",
                    "shard the mask's query (or key) dim like q's sequence",
                )
        elif hasattr(mask, "meta") and example_value(mask).ndim >= 2 and example_value(mask).shape[-2] != 1:
            if example_value(mask).shape[-2] != int(s.global_length) or not ctx.global_view:
                ctx.refuse(
                    node,
                    f"takes a replicated attn_mask of shape {tuple(example_value(mask).shape)} over the sharded "
                    "queries",
                    "shard the mask like the queries, or give it size 1 along the query dim",
                )
            mask_shard = "whole"  # every query row on every rank (a causal or distance mask built from shapes)
        size = ctx.domain.size
        heads = example_value(q).shape[-3] if ndim >= 3 else 0
        kv_heads = example_value(k).shape[-3] if ndim >= 3 else 0
        divides = heads % size == 0 and kv_heads % size == 0 if a["enable_gqa"] else heads >= size
        if kv_sharded and ndim >= 3 and heads >= size and kv_heads >= size and divides:
            return Decision(s, _call(attention_ops.sdpa_by_heads, {"mask_shard": mask_shard}), s, "heads")
        extra = {"keys_sharded": kv_sharded, "mask_shard": mask_shard}
        return Decision(s, _call(attention_ops.sdpa_by_gathered_keys, extra), s, "gather")

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


def _call(kernel, extra: dict):
    def call(node) -> KernelCall:
        a = bind(_SDPA_SIG, node)
        return KernelCall(kernel, tuple(a.values()), extra)

    return call
