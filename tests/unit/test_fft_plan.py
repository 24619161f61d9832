"""The slab-FFT planner (fxhalo/ops/spectral.py) against torch, on one process.

For every transform kind (c2c forward and inverse, r2c, c2r, and the 1-D Hermitian
pair), sets of dims in and out of order, with and without ``s`` (padding every
transformed dim by 2) and every ``norm``, and each transformed dim as the sharded one:
the plan's one-dimensional steps, run on the whole tensor with the moves skipped (a move
changes where rows live, not their values), give torch's N-D transform, and the carrier's
length is the output's.  A wrong order of the real dim, a wrong ``n`` or a norm that does
not compose fails here, without a process group.
"""

import itertools

import pytest
import torch

from fxhalo.domain import balanced_lengths
from fxhalo.ops.spectral import FftOp, NoCarrier, _one_d, plan_fft

SHAPE = (2, 3, 8, 6)
N_D = {"c2c": torch.fft.fftn, "ic2c": torch.fft.ifftn, "r2c": torch.fft.rfftn, "c2r": torch.fft.irfftn}
ONE_D = {"hc2r": torch.fft.hfft, "ir2hc": torch.fft.ihfft}
DIMS = [(2,), (3,), (1, 2), (2, 3), (3, 2), (1, 2, 3), (2, 3, 1)]


def _cases():
    for kind, dims, pad, norm in itertools.product(N_D, DIMS, (False, True), (None, "ortho", "forward")):
        yield kind, dims, pad, norm
    for kind, dims, norm in itertools.product(ONE_D, [(2,), (3,)], (None, "ortho")):
        yield kind, dims, False, norm


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, dims, pad, norm", list(_cases()))
def test_the_plan_is_torchs_transform(kind, dims, pad, norm):
    g = torch.Generator().manual_seed(0)
    real = kind in ("r2c", "ir2hc")
    x = torch.randn(SHAPE, dtype=torch.float64 if real else torch.complex128, generator=g)
    ns = tuple(SHAPE[d] + 2 if pad else None for d in dims)
    if kind in ONE_D:
        want = ONE_D[kind](x, n=ns[0], dim=dims[0], norm=norm)
    else:
        want = N_D[kind](x, s=ns if pad else None, dim=dims, norm=norm)
    for shard in dims:
        try:
            plan = plan_fft(FftOp(dims, ns, norm, kind), SHAPE, shard, 2, lambda n: balanced_lengths(n, 2))
        except NoCarrier:
            continue
        got = x
        for step in plan.steps:
            if step.kind != "move":
                got = _one_d(step.kind, got, step)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-9), (shard, plan)
        assert plan.carrier_length == want.shape[plan.carrier]
