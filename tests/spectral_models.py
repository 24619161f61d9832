"""Spectral models for the tests: an FNO-style spectral convolution written the classic way."""

from __future__ import annotations

import torch
import torch.nn as nn


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
