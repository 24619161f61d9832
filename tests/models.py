"""Model factories for tests and for ``python -m fxhalo explain tests/models.py:small_unet``."""

import torch.nn as nn
import torch.nn.functional as F

from fxhalo.models import SmallUNet, small_unet  # noqa: F401


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
