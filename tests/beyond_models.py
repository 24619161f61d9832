"""Models for tests/distributed/test_beyond_halos.py: an FNO-style spectral convolution written the
classic way, attention over the H*W tokens of a field, and chains of products that contract the shard."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpectralConv2d(nn.Module):
    """Li et al.'s spectral convolution: rfft2, keep ``m1 x m2`` low modes at both ends of H, mix channels
    with complex weights, irfft2 back to the input's size."""

    def __init__(self, cin: int, cout: int, m1: int, m2: int):
        super().__init__()
        self.cout, self.m1, self.m2 = cout, m1, m2
        scale = 1 / (cin * cout)
        self.w1 = nn.Parameter(scale * torch.randn(cin, cout, m1, m2, dtype=torch.cfloat))
        self.w2 = nn.Parameter(scale * torch.randn(cin, cout, m1, m2, dtype=torch.cfloat))

    def forward(self, x):
        B, _, H, W = x.shape
        x_ft = torch.fft.rfft2(x)
        out_ft = torch.zeros(B, self.cout, H, W // 2 + 1, dtype=torch.cfloat, device=x.device)
        m1, m2 = self.m1, self.m2
        out_ft[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], self.w1)
        out_ft[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], self.w2)
        return torch.fft.irfft2(out_ft, s=(H, W))


class FNOBlock(nn.Module):
    """One Fourier layer: the spectral convolution plus a pointwise (1x1) conv, then GELU."""

    def __init__(self, width: int = 4, m1: int = 3, m2: int = 3):
        super().__init__()
        self.spectral = SpectralConv2d(width, width, m1, m2)
        self.pointwise = nn.Conv2d(width, width, 1)

    def forward(self, x):
        return torch.nn.functional.gelu(self.spectral(x) + self.pointwise(x))


class TokenAttention(nn.Module):
    """Multi-head attention over the H*W tokens of a ``[B, C, H, W]`` field (sharded along H, the tokens
    are sharded), with a residual.  ``kv_heads`` < ``heads``: grouped-query attention.  ``mask``:
    ``"keys"`` a key padding mask computed from the tokens (sharded along the keys), ``"queries"`` a
    ``[B, 1, L, L]`` mask sharded along the queries, ``"distance"`` a replicated ``[L, L]`` band built
    from the shape."""

    def __init__(self, channels=8, heads=4, kv_heads=None, causal=False, mask=None, dropout=0.0, scale=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = channels // heads
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(channels, channels)
        self.causal, self.mask, self.dropout, self.scale = causal, mask, dropout, scale

    def _mask(self, t, H, W):
        i = torch.arange(H * W, device=t.device)
        near = (i[:, None] - i[None, :]).abs() <= 2 * W
        if self.mask == "keys":
            return (t.sum(-1) > -1.0)[:, None, None, :]
        if self.mask == "queries":
            return near | (t.sum(-1) > 0)[:, None, :, None]
        if self.mask == "distance":
            return near
        return None

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, H*W, C]: the tokens, sharded
        q = self.q(t).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(t).unflatten(-1, (2, self.kv_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=self._mask(t, H, W),
            dropout_p=self.dropout,
            is_causal=self.causal,
            scale=self.scale,
            enable_gqa=self.kv_heads != self.heads,
        )
        return x + self.out(y.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(B, C, H, W)


class ContractChain(nn.Module):
    """``x @ a @ b`` contracting the sharded tokens, then a mean: linear all the way, so one sum (of a
    number) for the chain."""

    def __init__(self, tokens: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(tokens, 6) / tokens)
        self.b = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):  # [B, C, T], T sharded
        return x * (x @ self.a @ self.b).mean()


class ContractScatter(nn.Module):
    """Tokens mixed by a ``T x T`` matrix (a partial sum at the whole shape) added to the sharded input:
    each rank needs only its own rows of the sum, a reduce-scatter."""

    def __init__(self, tokens: int):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(tokens, tokens) / tokens)

    def forward(self, x):  # [B, C, T], T sharded
        return x + torch.relu(x) @ self.mix


class LongRangeWindows(nn.Module):
    """CrossFormer's long-distance attention, written out: the map cut into windows whose rows are strided
    over the whole map (``(l1 h) (l2 w) -> (b h w) c l1 l2``, the window's rows ``l1`` outside), a 1x1
    conv for q, k, v, attention per window by ``einsum``, and back, with a residual."""

    def __init__(self, channels: int = 4, heads: int = 2, window: int = 2):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        s, h, w = self.window, H // self.window, W // self.window
        t = x.reshape(B, C, s, h, s, w).permute(0, 3, 5, 1, 2, 4).reshape(B * h * w, C, s, s)
        q, k, v = self.qkv(t).chunk(3, dim=1)
        q, k, v = (u.reshape(B * h * w, self.heads, C // self.heads, s * s).transpose(-2, -1) for u in (q, k, v))
        attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        y = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(-2, -1).reshape(B * h * w, C, s, s)
        y = self.out(y).reshape(B, h, w, C, s, s).permute(0, 3, 4, 1, 5, 2).reshape(B, C, H, W)
        return x + y
