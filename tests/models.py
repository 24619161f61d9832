"""Model factories for tests and for ``python -m fxhalo explain tests/models.py:small_unet``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxhalo.models import SkipUNet, SmallUNet, small_unet  # noqa: F401


class WindowConvBlock(nn.Module):
    """CrossFormer-style windows of NCHW, H sharded: the shard lands in the window (batch) dim, interleaved
    with B; a 3x3 and a 1x1 conv, a GroupNorm and attention run inside each window, then the reverse."""

    def __init__(self, ws=2, c=4):
        super().__init__()
        self.ws = ws
        self.conv3, self.conv1, self.norm = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.GroupNorm(2, c)

    def forward(self, x):
        B, C, H, W = x.shape
        ws = self.ws
        win = x.view(B, C, H // ws, ws, W // ws, ws).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, ws, ws)
        win = self.norm(self.conv1(self.conv3(win)))
        tokens = win.flatten(2).transpose(1, 2)  # (windows, ws*ws, C): attention inside each window
        tokens = F.scaled_dot_product_attention(tokens, tokens, tokens)
        win = tokens.transpose(1, 2).reshape(-1, C, ws, ws)
        return win.view(B, H // ws, W // ws, C, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


class GridModel(nn.Module):
    """Neural-operator style: a positional grid built from ``x.shape`` joins the input channels, a
    strided conv, then ``interpolate(size=x.shape[-2:])`` back to the input's global size."""

    def __init__(self, c=2):
        super().__init__()
        self.lift = nn.Conv2d(c + 2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(4, c, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        gy = torch.linspace(0, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        gx = torch.linspace(0, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        y = F.gelu(self.lift(torch.cat([x, gy, gx], 1)))
        y = F.interpolate(self.down(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(y) * torch.cos(gy)


class NormsOverBoth(nn.Module):
    """LayerNorm over (C, H, W) and RMSNorm over (H, W), at the global sizes, after a conv."""

    def __init__(self, c, h, w):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.ln = nn.LayerNorm([c, h, w])
        self.rms = nn.RMSNorm([h, w])
        with torch.no_grad():  # affine terms away from (1, 0), so their effect and gradients show
            for p in (self.ln.weight, self.ln.bias, self.rms.weight):
                p.add_(0.3 * torch.randn_like(p))

    def forward(self, x):
        return self.rms(self.ln(self.conv(x)))


class SwinBlock(nn.Module):
    """A Swin Transformer block on a ``[B, C, H, W]`` field: ``ws x ws`` windows (optionally shifted by
    ``shift`` with ``torch.roll``), a pre-norm, multi-head attention inside each window, the windows put
    back, a residual.  On a mesh the window index merges the H and W window counts into one dim."""

    def __init__(self, channels: int = 8, ws: int = 2, heads: int = 2, shift: int = 0):
        super().__init__()
        self.ws, self.heads, self.shift = ws, heads, shift
        self.norm, self.qkv, self.proj = (
            nn.LayerNorm(channels),
            nn.Linear(channels, 3 * channels),
            nn.Linear(channels, channels),
        )

    def forward(self, x):
        b, c, h, w = x.shape
        ws, t = self.ws, x.permute(0, 2, 3, 1)
        if self.shift:
            t = torch.roll(t, (-self.shift, -self.shift), (1, 2))
        win = t.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        n = win.shape[0]
        q, k, v = self.qkv(self.norm(win)).reshape(n, ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, ws * ws, c)
        y = self.proj(y).reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        return x + y.permute(0, 3, 1, 2)
