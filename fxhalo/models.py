"""Small reference models that the demo, the tests and the benchmarks share.

:class:`SmallUNet` has every layer kind a weather or PDE UNet uses along the
sharded dim: 3×3 convs, GroupNorm, a kernel-3 / stride-2 downsample, an
upsample (bilinear or nearest), a skip concatenation and a 1×1 head.
:class:`SkipUNet` resizes to each skip's global size, so it runs on any length
(721 latitudes), with GroupNorm, InstanceNorm and max-pooling.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SkipUNet", "SmallUNet", "small_unet"]


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


def _unet_block(c_in, c_out):
    # No conv bias before a norm: the norm removes it, so its true gradient is zero and the computed
    # one is rounding noise, which no tolerance relative to it can judge.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(2, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.SiLU(),
    )


class SkipUNet(nn.Module):
    """A UNet whose decoder resizes to each skip's *global* size (``interpolate(size=skip.shape[-2:])``)
    and concatenates: on odd lengths the local shapes of a per-rank trace never match; the global view
    partitions it.  ``depth`` max-pools halve the rows, so deep levels get shorter than the rank count."""

    def __init__(self, c=2, width=4, depth=2):
        super().__init__()
        widths = [width * 2**i for i in range(depth)]
        self.downs = nn.ModuleList(_unet_block(a, b) for a, b in zip([c, *widths], widths))
        self.mid = _unet_block(widths[-1], widths[-1])
        self.ups = nn.ModuleList(
            _unet_block(2 * w, widths[max(i - 1, 0)]) for i, w in reversed(list(enumerate(widths)))
        )
        self.out = nn.Conv2d(width, c, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for up in self.ups:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = up(torch.cat([x, skip], 1))
        return self.out(x)
