"""The statistics merge of fxhalo.ops.moments, on simulated ranks (chunks of one tensor, summed as all_reduce would).

This is the evidence behind the scheme in ``global_moments``: plain fp32 sums of
``x`` and ``x^2`` cancel catastrophically at mean 1e3, std 1; shifted sums merged
in float64, with the mean kept as an fp32 hi + lo pair, match the float64
one-device result to fp32 rounding, where the fp32 one-device GroupNorm does not.
"""

import pytest
import torch
import torch.nn.functional as F

from fxhalo.ops.moments import local_sums, moments_from_sums, normalize

DIMS = (2, 3, 4)  # of the grouped view [N, G, C/G, H, W]


def _group_norm_on_ranks(x, groups, ranks, sums):
    """GroupNorm of ``x`` whose H is split into ``ranks`` chunks; ``sums`` builds each chunk's statistics."""
    n, c = x.shape[:2]
    grouped = x.view(n, groups, c // groups, *x.shape[2:])
    total = sum(sums(chunk) for chunk in grouped.chunk(ranks, dim=3))  # what the all_reduce adds up
    mean, m2 = moments_from_sums(total[:2], grouped[0, 0].numel())
    return normalize(grouped, mean, m2 / grouped[0, 0].numel(), 1e-5).view_as(x)


def _plain_fp32_sums(chunk):
    return torch.stack([chunk.sum(DIMS, keepdim=True), (chunk * chunk).sum(DIMS, keepdim=True)]).double()


@pytest.mark.parametrize("mean", [0.0, 1e3, 1e4])
def test_shifted_float64_sums_match_float64_where_fp32_one_device_does_not(mean):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, 64) + mean
    exact = F.group_norm(x.double(), 2)
    ours = _group_norm_on_ranks(x, 2, 4, lambda chunk: local_sums(chunk, DIMS))
    assert (ours.double() - exact).abs().max() < 1e-6
    if mean:
        assert (F.group_norm(x, 2).double() - exact).abs().max() > 1e-5  # fp32 one device misses by more


def test_plain_fp32_sums_cancel_at_mean_1e3():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, 64) + 1e3
    exact = F.group_norm(x.double(), 2)
    assert (_group_norm_on_ranks(x, 2, 4, _plain_fp32_sums).double() - exact).abs().max() > 1e-2


def test_local_sums_gradient_is_that_of_the_plain_sums():
    x = (torch.randn(3, 5, dtype=torch.float64) + 7).requires_grad_()
    g = torch.randn(3, 3, 1, dtype=torch.float64)  # the third row, the count, is a constant
    (got,) = torch.autograd.grad(local_sums(x, (1,)), x, g)
    (want,) = torch.autograd.grad(torch.stack([x.sum(1, keepdim=True), (x * x).sum(1, keepdim=True)]), x, g[:2])
    torch.testing.assert_close(got, want)
