"""The resampling geometry against torch itself, in one process, on many sizes.

Every planner derives each rank's rows from a handful of formulas; these tests
compare the formulas with torch on the whole axis, so that a wrong formula shows
up here with its sizes rather than as a mismatch on some edge rank of the sweep.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from fxhalo.ops.adaptive_pool import adaptive_bins
from fxhalo.ops.conv_transpose import TransposedDim
from fxhalo.ops.interpolate import DimResize, dim_resize, source_taps
from fxhalo.ops.pool import PoolDim

RNG = random.Random(0)


def _pool_dims(n_cases):
    for _ in range(n_cases):
        k = RNG.randint(1, 5)
        yield (
            PoolDim(k, RNG.randint(1, 4), RNG.randint(0, k // 2), RNG.randint(1, 3), RNG.random() < 0.5),
            RNG.randint(1, 20),
        )


@pytest.mark.timeout(60)
def test_pool_output_length_matches_torch_with_ceil_mode():
    for sdim, n in _pool_dims(400):
        try:
            want = F.max_pool1d(
                torch.zeros(1, 1, n), sdim.kernel, sdim.stride, sdim.padding, sdim.dilation, sdim.ceil_mode
            ).shape[-1]
        except RuntimeError:
            continue
        assert sdim.out_length(n) == want, (sdim, n)


@pytest.mark.timeout(60)
def test_average_divisors_count_padding_only_inside_the_implicit_padding():
    for sdim, n in _pool_dims(400):
        sdim = PoolDim(sdim.kernel, sdim.stride, sdim.padding, 1, sdim.ceil_mode)
        ones = torch.ones(1, 1, n, dtype=torch.float64)
        try:
            with_pad = F.avg_pool1d(ones, sdim.kernel, sdim.stride, sdim.padding, sdim.ceil_mode, True)[0, 0]
            without = F.avg_pool1d(ones, sdim.kernel, sdim.stride, sdim.padding, sdim.ceil_mode, False)[0, 0]
        except RuntimeError:
            continue
        for o in range(with_pad.numel()):
            real = sdim.divisor(o, n, False)
            assert with_pad[o].item() == pytest.approx(real / sdim.divisor(o, n, True)), (sdim, n, o)
            assert without[o].item() == pytest.approx(1.0), (sdim, n, o)


@pytest.mark.timeout(60)
def test_transposed_conv_length_and_contributing_rows():
    for _ in range(300):
        k, s, d = RNG.randint(1, 5), RNG.randint(1, 4), RNG.randint(1, 3)
        sdim = TransposedDim(k, s, RNG.randint(0, d * (k - 1) + 1), RNG.randint(0, max(s, d) - 1), d)
        n = RNG.randint(1, 12)
        try:
            want = F.conv_transpose1d(
                torch.zeros(1, 1, n), torch.zeros(1, 1, k), None, s, sdim.padding, sdim.output_padding, 1, d
            ).shape[-1]
        except RuntimeError:
            continue
        m = sdim.out_length(n)
        assert m == want
        for c in range(m):
            for e in range(c + 1, min(m, c + 4) + 1):
                writers = {i for i in range(n) for t in range(k) if c <= i * s - sdim.padding + t * d < e}
                lo, hi = sdim.contributing(c, e)  # may reach past the tensor: those rows do not exist
                lo, hi = max(lo, 0), min(hi, n)
                assert writers <= set(range(lo, hi)), (sdim, n, c, e)
                if writers and d == 1:  # dilation leaves gaps in the hull; without it the hull is tight
                    assert min(writers) == lo and max(writers) == hi - 1, (sdim, n, c, e)


def _resize_cases(n_cases):
    """``(n, F.interpolate arguments)`` with at least one output row."""
    while n_cases:
        n = RNG.randint(1, 24)
        if RNG.random() < 0.5:
            how = dict(size=RNG.randint(1, 50))
        else:
            how = dict(
                scale_factor=RNG.choice([0.5, 0.75, 1.5, 2.0, 2.5, 1 / 3, 4 / 3, 1.1, 3.0]),
                recompute_scale_factor=RNG.choice([None, True]),
            )
            if int(n * how["scale_factor"]) < 1:
                continue
        n_cases -= 1
        yield n, how


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["linear", "bicubic"])
def test_source_rows_and_weights_reproduce_torch(mode):
    """Applying the taps to the whole axis must give torch's own interpolation."""
    for n, how in _resize_cases(300):
        for align in (False, True):
            x = torch.randn(n, dtype=torch.float32)
            if mode == "linear":
                want = F.interpolate(x.view(1, 1, n), mode=mode, align_corners=align, **how).flatten()
                sdim, nd = 0, 1
            else:  # bicubic exists in 2-D only: resize H, keep W = 1
                how2 = {k: ((v, 1) if k == "size" else (v, 1.0) if k == "scale_factor" else v) for k, v in how.items()}
                want = F.interpolate(x.view(1, 1, n, 1), mode=mode, align_corners=align, **how2).flatten()
                sdim, nd = 0, 2
            r = dim_resize(n, how.get("size"), how.get("scale_factor"), how.get("recompute_scale_factor"), sdim, 1)
            rows, weights = source_taps(mode, nd, sdim, r, align, False)
            got = (x[torch.tensor(rows)] * torch.tensor(weights)).sum(1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{mode} n={n} {how} align={align}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_index_table_is_torchs(mode, nd, dtype):
    """Taken from torch on a ramp with other dims of size 1; must hold for real sizes too."""
    for n, how in _resize_cases(40):
        r = dim_resize(n, how.get("size"), how.get("scale_factor"), how.get("recompute_scale_factor"), 0, 1)
        rows, _ = source_taps(mode, nd, 0, r, False, dtype == torch.float64)
        shape = (2, 3, n) + (5,) * (nd - 1)
        ramp = torch.arange(n, dtype=dtype).view(1, 1, n, *(1,) * (nd - 1)).expand(shape).contiguous()
        sizes = (r.n_out,) + (5,) * (nd - 1)
        if r.scale is None:
            want = F.interpolate(ramp, size=sizes, mode=mode)
        else:
            want = F.interpolate(ramp, scale_factor=(r.scale,) + (1.0,) * (nd - 1), mode=mode)
        assert rows[:, 0].tolist() == want[(0, 0, slice(None)) + (0,) * (nd - 1)].long().tolist(), (n, how)


@pytest.mark.timeout(60)
def test_adaptive_bins_match_torch():
    for _ in range(200):
        n, m = RNG.randint(1, 30), RNG.randint(1, 30)
        ramp = torch.arange(n, dtype=torch.float32).view(1, 1, n)
        last = F.adaptive_max_pool1d(ramp, m)[0, 0].long().tolist()
        first = (-F.adaptive_max_pool1d(-ramp, m))[0, 0].long().tolist()
        assert [adaptive_bins(n, m, o) for o in range(m)] == [(a, b + 1) for a, b in zip(first, last)], (n, m)


@pytest.mark.timeout(60)
def test_scale_factor_gives_the_coordinate_scale_unless_recomputed():
    assert dim_resize(10, None, 1.5, None, 0, 1) == DimResize(10, 15, 1.5)
    assert dim_resize(10, None, 1.55, None, 0, 1) == DimResize(10, 15, 1.55)  # floor(15.5); scale kept
    assert dim_resize(10, None, 1.55, True, 0, 1) == DimResize(10, 15, None)  # recomputed: 10/15
    assert dim_resize(10, (7, 3), None, None, 0, 2) == DimResize(10, 7, None)
