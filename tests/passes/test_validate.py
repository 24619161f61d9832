"""fxhalo.validate in one process, for simulated domains: each kind of problem is reported."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxhalo


class Deep(nn.Module):
    """Three stride-2 levels: local H of 8 is fine on 2 ranks... until the third level."""

    def __init__(self):
        super().__init__()
        self.downs = nn.ModuleList(nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(3))

    def forward(self, x):
        for d in self.downs:
            x = d(x)
        return x


class Windows(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, c, h // 4, 4, w // 4, 4).sum(dim=(3, 5))  # SUM-LINE


def test_clean_model_has_no_problems():
    assert fxhalo.validate(nn.Conv2d(1, 2, 3, padding=1), torch.randn(1, 1, 8, 8), world_size=4) == []


def test_stride_that_stops_dividing_at_depth_is_reported():
    problems = fxhalo.validate(Deep(), torch.randn(1, 1, 4, 8), world_size=2)
    assert [p.kind for p in problems] == ["refused"]
    assert "conv2d" in problems[0].op and "global output length of 1 rows" in problems[0].message


def test_window_that_does_not_divide_the_shard_is_reported():
    problems = fxhalo.validate(Windows(), torch.randn(1, 1, 6, 8), world_size=2)
    assert problems and problems[0].kind in ("refused", "trace")


def test_refused_ops_are_all_listed_with_line_and_remedy():
    class TwoRefusals(nn.Module):
        def forward(self, x):
            a = torch.renorm(x, p=2, dim=0, maxnorm=1.0)  # norms over the sharded dim
            return torch.roll(a, 1)  # no dims: the flattened tensor

    problems = fxhalo.validate(TwoRefusals(), torch.randn(1, 1, 4, 4), world_size=4)
    assert [p.kind for p in problems] == ["refused", "refused"]
    assert "renorm" in problems[0].op and "roll" in problems[1].op
    assert all("test_validate.py" in p.source and "Remedy:" in p.message for p in problems)


def test_wide_halo_is_reported():
    problems = fxhalo.validate(nn.Conv2d(1, 1, 7, padding=3), torch.randn(1, 1, 2, 8), world_size=4)
    assert [p.kind for p in problems] == ["wide halo"]
    assert "halo of 3 rows" in problems[0].message and "2-row shards" in problems[0].message


def test_torch_errors_on_the_local_shape_are_reported():
    class ReflectWide(nn.Module):
        def forward(self, x):
            return F.pad(x, (0, 0, 3, 3), mode="reflect")

    problems = fxhalo.validate(ReflectWide(), torch.randn(1, 1, 2, 4), world_size=2)
    assert [p.kind for p in problems] == ["trace"]


def test_global_view_validates_global_inputs():
    """The model SmallUNet cannot take 45 rows at all (its skip cat); SkipUNet can, on any rank count."""
    from fxhalo.models import SkipUNet, SmallUNet

    x = torch.empty(1, 1, 45, 16, device="meta")
    assert fxhalo.validate(SkipUNet(c=1, width=2, depth=4), x, world_size=4, global_view=True) == []
    problems = fxhalo.validate(SmallUNet(), x, world_size=4, global_view=True)
    assert [p.kind for p in problems] == ["trace"]


def test_a_pixel_shuffle_of_uneven_shards_is_local_in_the_global_view():
    """13 rows split 7 + 6 become 14 + 12 of 26 (each rank's rows doubled), which a DomainTensor carries;
    before, the rule refused it, asking for 'a local size divisible by 1'."""
    x = torch.empty(1, 8, 13, 10, device="meta")
    assert fxhalo.validate(nn.PixelShuffle(2), x, world_size=2, global_view=True) == []
    assert fxhalo.validate(nn.PixelShuffle(2), x, world_size=2, global_view=True, partition=(8, 5)) == []
