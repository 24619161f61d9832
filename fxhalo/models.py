"""Small reference models that the demo, the tests and the benchmarks share.

:class:`SmallUNet` has every layer kind a weather or PDE UNet uses along the
sharded dim: 3×3 convs, GroupNorm, a kernel-3 / stride-2 downsample, an
upsample (bilinear or nearest), a skip concatenation and a 1×1 head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SmallUNet", "small_unet"]


class _Block(nn.Module):
    """conv 3×3 → GroupNorm → GELU, twice."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)

    def forward(self, x):
        x = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(x)))


class SmallUNet(nn.Module):
    """A two-level UNet: ``in_channels`` → ``out_channels`` at the same resolution.

    ``upsample`` is ``"bilinear"`` or ``"nearest"``.

    With ``skip=True`` (the default) the ×2 upsample is concatenated with the
    encoder's output, so every rank's *local* height must be even: Dynamo traces the
    model on each rank's slab, and on an odd slab the two would not concatenate
    (asking the upsample for the skip's size instead would bake a local size into
    the graph).  ``skip=False`` drops the concatenation: the model then maps ``H``
    rows to ``2 * ceil(H / 2)`` and traces on any slab, uneven shards included.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 8,
        groups: int = 4,
        upsample: str = "bilinear",
        skip: bool = True,
    ):
        super().__init__()
        self.upsample = upsample
        self.skip = skip
        self.enc = _Block(in_channels, width, groups)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = _Block(2 * width, 2 * width, groups)
        self.dec = _Block(3 * width if skip else 2 * width, width, groups)
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x):
        skip = self.enc(x)
        h = self.mid(self.down(skip))
        if self.upsample == "nearest":
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        else:
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        if self.skip:
            h = torch.cat([h, skip], dim=1)
        return self.head(self.dec(h))


def small_unet(**kwargs) -> SmallUNet:
    """Factory for ``python -m fxhalo explain fxhalo.models:small_unet``."""
    return SmallUNet(**kwargs)
