"""Scaled dot-product attention over a sharded sequence dim: two exact kernels.

``F.scaled_dot_product_attention(q, k, v)`` with q, k, v of shape ``(..., heads, L, E)``
and the sequence ``L`` sharded.  Every query needs every key, so the kernels move data:

* :func:`sdpa_by_heads` (DeepSpeed-Ulysses): one move
  (:func:`fxhalo.redistribute.redistribute_slabs`; q, k and v in one when they have one
  shape, else one per shape) puts the shard on the heads instead of the
  tokens, each rank attends its heads over the whole sequence with torch's own kernel,
  and one move takes the output back to the token shard.  Needs the query heads
  (and with ``enable_gqa`` the key/value heads) to be at least the rank count, so that
  every rank gets heads; with GQA, each rank's query heads then use exactly its
  key/value heads when both counts divide by the rank count.  Memory per rank: the
  tokens of its heads, ``O(L * heads / P)``.
* :func:`sdpa_by_gathered_keys`: the keys and values are all-gathered (one all-gather
  each; their backward is a reduce-scatter that sums every rank's gradient of each key
  into its owner) and each rank attends its own queries.  Works for any head count;
  memory per rank: the whole keys and values plus ``local queries x L`` scores.

Causal attention is torch's top-left aligned mask (query ``i`` sees keys ``j <= i``).
On the gathered path the local queries start at global row ``a``, so the kernel
builds that mask shifted by ``a``.  An ``attn_mask`` sharded with the queries (its
query dim sharded like q's sequence) moves with them: the heads path gathers it whole
when it broadcasts over the heads (a mask is ``O(L^2)`` anyway) and moves it onto its
heads otherwise; the gathered path uses its rows as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..domain import Domain, ShardAxis, all_gather_rows, one_axis
from ..redistribute import redistribute_slab, redistribute_slabs

__all__ = ["sdpa_by_heads", "sdpa_by_gathered_keys"]


def _domain(axes):
    dim, group_name, length = one_axis(axes)
    domain = Domain.from_group(group_name, shard_dim=dim)
    return group_name, domain, tuple(domain.lengths(length))


def _whole_keys(mask, mask_shard, group_name, tokens):
    """A mask sharded along the keys (a key padding mask) gathered whole: every query sees every key."""
    if mask is not None and mask_shard == "keys":
        return all_gather_rows(mask, mask.ndim - 1, tokens, group_name)
    return mask


def _all_to_heads(tensors, group_name, domain, tokens):
    """:func:`_to_heads` of each tensor; those of one shape and dtype travel together, in one collective
    (q, k and v of plain attention: one all_to_all instead of three, and no stacked copy)."""
    out: list = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype), []).append(i)
    for members in groups.values():
        heads = tuple(domain.lengths(tensors[members[0]].shape[-3]))
        moved = redistribute_slabs([tensors[i] for i in members], -2, -3, group_name, tokens, heads, domain.rank)
        for i, t in zip(members, moved):
            out[i] = t
    return out


def _to_heads(t, group_name, domain, tokens):
    """``(..., H, L_local, E)`` -> ``(..., H_local, L, E)``: the shard from the tokens to the heads."""
    heads = domain.lengths(t.shape[-3])
    return redistribute_slab(t, -2, -3, group_name, tokens, tuple(heads), domain.rank)


def sdpa_by_heads(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    mask_shard: str | None = None,
    axes: tuple[ShardAxis, ...],
):
    """Attention over the sharded sequence by moving the shard to the heads and back (see the module).
    ``mask_shard``: ``"queries"`` or ``"keys"``, the mask dim sharded like the sequence; ``"whole"``:
    replicated over every query; ``None``: replicated, of size 1 along the query dim."""
    group_name, domain, tokens = _domain(axes)
    q, k, v = _all_to_heads((query, key, value), group_name, domain, tokens)
    mask = _whole_keys(attn_mask, mask_shard, group_name, tokens)
    per_head = mask is not None and mask.ndim >= 3 and mask.shape[-3] == query.shape[-3] > 1
    if mask is not None and mask_shard == "queries":
        if per_head:  # one mask per head: move it like q
            mask = _to_heads(mask, group_name, domain, tokens)
        else:  # one mask for every head: every rank needs all its query rows
            mask = all_gather_rows(mask, mask.ndim - 2, tokens, group_name)
    elif per_head:  # a replicated mask per head: this rank's heads
        a, b = domain.bounds(query.shape[-3])
        mask = mask.narrow(-3, a, b - a)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    heads = tuple(domain.lengths(query.shape[-3]))
    return redistribute_slab(out, -3, -2, group_name, heads, tokens, domain.rank)


def sdpa_by_gathered_keys(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    keys_sharded: bool = True,
    mask_shard: str | None = None,
    axes: tuple[ShardAxis, ...],
):
    """Attention of this rank's queries over every key: keys and values all-gathered (see the module).
    ``keys_sharded=False``: key and value are already whole on every rank (replicated).  ``mask_shard``:
    as for :func:`sdpa_by_heads` (a mask sharded along the queries is used as it is)."""
    group_name, domain, tokens = _domain(axes)
    start = sum(tokens[: domain.rank])  # this rank's first query, in global rows
    attn_mask = _whole_keys(attn_mask, mask_shard, group_name, tokens)
    if mask_shard == "whole":  # a replicated mask over every query: this rank's rows
        attn_mask = attn_mask.narrow(attn_mask.ndim - 2, start, tokens[domain.rank])
    if keys_sharded:  # split like the queries (the rule checks)
        key = all_gather_rows(key, key.ndim - 2, tokens, group_name)
        value = all_gather_rows(value, value.ndim - 2, tokens, group_name)
    if is_causal:
        rows = torch.arange(start, start + query.shape[-2], device=query.device)
        cols = torch.arange(key.shape[-2], device=query.device)
        attn_mask = cols[None, :] <= rows[:, None]  # torch's causal mask, shifted to this rank's queries
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
    )
