"""The benchmark models and their inputs.

Each :class:`BenchModel` says how to build the model for a configuration, the
global input shape, and which tensor dim is sharded.  Every model here keeps its
sharded dim splittable by the rank counts we use (2 and 4) at every depth.

* ``unet2d``: :class:`fxhalo.models.SmallUNet` (3x3 convs, GroupNorm, a stride-2
  downsample, a bilinear x2 upsample, a skip concatenation), NCHW, sharded along H.
* ``conv3d``: a stack of 3x3x3 convs with GELU, NCDHW, sharded along H (dim 3):
  CREDIT's ``DomainParallelConv3d`` always shards dim 3, so the rows stay comparable.
* ``causal1d``: a stack of causal depthwise 1-D convs, ``F.pad(x, (K-1, 0))`` then
  ``nn.Conv1d(groups=C)``, each followed by GELU, a 1x1 mix and a residual add, NCL,
  sharded along L.  The pad along the sharded dim is folded into the conv's halo by
  fxhalo; CREDIT has no Conv1d wrapper.
* ``fno``: a 2-D Fourier neural operator (:class:`FNO2d`: a 1x1 lift, Fourier layers of
  ``rfft2`` / kept modes / ``irfft2`` plus a 1x1 conv, a 1x1 projection), NCHW, sharded
  along H.  Its FFTs need the whole H: fxhalo runs it in the global view (``global_view``).
* ``attn-unet``: :class:`AttentionUNet`, SmallUNet with multi-head self-attention over
  the bottleneck's tokens (the diffusion-UNet pattern), NCHW, sharded along H; also in
  the global view (the attention reads every token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxhalo.models import SmallUNet

__all__ = ["Config", "BenchModel", "MODELS", "Conv3dStack", "CausalDepthwiseStack", "FNO2d", "AttentionUNet"]


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration: ``size`` is the length of every spatial dim."""

    model: str
    size: int
    batch: int
    width: int


class Conv3dStack(nn.Module):
    """``depth`` 3x3x3 convs (padding 1) with GELU between them: 1 -> width -> ... -> 1 channels."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        chans = [1] + [width] * (depth - 1) + [1]
        self.convs = nn.ModuleList(nn.Conv3d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.gelu(x)
        return x


class CausalDepthwiseStack(nn.Module):
    """A 1x1 lift, ``depth`` causal depthwise blocks, a 1x1 head.

    A block is ``x + mix(gelu(dw(F.pad(x, (K-1, 0)))))``: output position ``t`` reads
    inputs ``t-K+1 .. t`` only (left padding, no future).
    """

    def __init__(self, width: int = 8, depth: int = 4, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.lift = nn.Conv1d(1, width, 1)
        self.dw = nn.ModuleList(nn.Conv1d(width, width, kernel, groups=width) for _ in range(depth))
        self.mix = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(depth))
        self.head = nn.Conv1d(width, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        for dw, mix in zip(self.dw, self.mix):
            x = x + mix(F.gelu(dw(F.pad(x, (self.kernel - 1, 0)))))
        return self.head(x)


class FNO2d(nn.Module):
    """A 1x1 lift from 3 channels, ``layers`` Fourier layers of ``width`` channels keeping ``modes`` x
    ``modes`` modes, a 1x1 projection to 1 channel (the layers of ``tests/beyond_models.py``)."""

    def __init__(self, width: int = 32, modes: int = 16, layers: int = 4):
        super().__init__()
        from tests.beyond_models import FNOBlock

        self.lift = nn.Conv2d(3, width, 1)
        self.blocks = nn.Sequential(*(FNOBlock(width, modes, modes) for _ in range(layers)))
        self.project = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return self.project(self.blocks(self.lift(x)))


class AttentionUNet(SmallUNet):
    """:class:`fxhalo.models.SmallUNet` with ``heads``-head self-attention (and a residual) over the
    ``(H/2) * (W/2)`` tokens of its bottleneck, before the upsample."""

    def __init__(self, width: int = 16, groups: int = 4, heads: int = 4):
        super().__init__(in_channels=1, out_channels=1, width=width, groups=groups)
        from tests.beyond_models import TokenAttention

        self.attention = TokenAttention(2 * width, heads)

    def forward(self, x):
        skip = self.enc(x)
        h = self.attention(self.mid(self.down(skip)))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([h, skip], dim=1)))


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """How to build one benchmark model and its global input."""

    name: str
    build: Callable[[Config], nn.Module]
    input_shape: Callable[[Config], tuple[int, ...]]
    shard_dim: int
    defaults: dict
    tiny: dict  # the smoke test's configuration: seconds, not minutes
    #: fxhalo's compiled row takes a DomainTensor of the input (the global view), not the bare slab:
    #: needed where an op reads the whole sharded dim (an FFT, attention over all tokens)
    global_view: bool = False

    def config(self, size=None, batch=None, width=None) -> Config:
        d = self.defaults
        return Config(self.name, size or d["size"], batch or d["batch"], width or d["width"])

    def tiny_config(self) -> Config:
        return Config(self.name, **self.tiny)


MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel(
            "unet2d",
            build=lambda c: SmallUNet(in_channels=1, out_channels=1, width=c.width, groups=4),
            input_shape=lambda c: (c.batch, 1, c.size, c.size),
            shard_dim=2,
            defaults={"size": 256, "batch": 2, "width": 8},
            tiny={"size": 32, "batch": 1, "width": 4},
        ),
        BenchModel(
            "conv3d",
            build=lambda c: Conv3dStack(width=c.width),
            input_shape=lambda c: (c.batch, 1, c.size, c.size, c.size),
            shard_dim=3,
            # Batch 2, not 1: torch's CPU conv picks oneDNN only when batch > 1 or N*C*D*H > 20480
            # (ConvParams::use_mkldnn), and its native conv3d is ~7x slower per voxel.  With batch 1 a
            # 64^3 slab of 34 rows falls under the threshold while the whole 64^3 input does not, so
            # the ranks would time a different kernel from the one process (docs/performance.md).
            defaults={"size": 64, "batch": 2, "width": 8},
            tiny={"size": 8, "batch": 1, "width": 2},
        ),
        BenchModel(
            "fno",
            build=lambda c: FNO2d(width=c.width, modes=max(c.size // 16, 2)),
            input_shape=lambda c: (c.batch, 3, c.size, c.size),
            shard_dim=2,
            defaults={"size": 256, "batch": 1, "width": 32},
            tiny={"size": 32, "batch": 1, "width": 4},
            global_view=True,
        ),
        BenchModel(
            "attn-unet",
            build=lambda c: AttentionUNet(width=c.width),
            input_shape=lambda c: (c.batch, 1, c.size, c.size),
            shard_dim=2,
            # 64 x 64: the bottleneck's 32 x 32 = 1024 tokens attend to each other (a 1024 x 1024 score
            # matrix per head); at 256 x 256 it would be 16384 x 16384
            defaults={"size": 64, "batch": 2, "width": 16},
            tiny={"size": 16, "batch": 1, "width": 4},
            global_view=True,
        ),
        BenchModel(
            "causal1d",
            build=lambda c: CausalDepthwiseStack(width=c.width),
            input_shape=lambda c: (c.batch, 1, c.size),
            shard_dim=2,
            defaults={"size": 2**20, "batch": 1, "width": 8},
            tiny={"size": 256, "batch": 1, "width": 4},
        ),
    )
}


def make(cfg: Config, seed: int = 0) -> nn.Module:
    """The model for ``cfg`` with the same weights in every process (seeded)."""
    torch.manual_seed(seed)
    return MODELS[cfg.model].build(cfg)


def make_input(cfg: Config, seed: int = 1) -> torch.Tensor:
    """The global input for ``cfg``, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(MODELS[cfg.model].input_shape(cfg), generator=g)
