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
from fxhalo.ops.spectral import AxisShard, FftOp, NoCarrier, _one_d, plan_fft

SHAPE = (2, 3, 8, 6)
N_D = {"c2c": torch.fft.fftn, "ic2c": torch.fft.ifftn, "r2c": torch.fft.rfftn, "c2r": torch.fft.irfftn}
ONE_D = {"hc2r": torch.fft.hfft, "ir2hc": torch.fft.ihfft}
DIMS = [(2,), (3,), (1, 2), (2, 3), (3, 2), (1, 2, 3), (2, 3, 1)]


def _cases():
    for kind, dims, pad, norm in itertools.product(N_D, DIMS, (False, True), (None, "ortho", "forward")):
        yield kind, dims, pad, norm
    for kind, dims, norm in itertools.product(ONE_D, [(2,), (3,)], (None, "ortho")):
        yield kind, dims, False, norm


def _input_and_torchs(kind, dims, pad, norm, shape, g):
    """A random input of ``shape`` for the transform (real for the real-input kinds), each transformed dim's
    ``n`` (its size + 2 with ``pad``), and torch's transform of it."""
    real = kind in ("r2c", "ir2hc")
    x = torch.randn(shape, dtype=torch.float64 if real else torch.complex128, generator=g)
    ns = tuple(shape[d] + 2 if pad else None for d in dims)
    if kind in ONE_D:
        return x, ns, ONE_D[kind](x, n=ns[0], dim=dims[0], norm=norm)
    return x, ns, N_D[kind](x, s=ns if pad else None, dim=dims, norm=norm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, dims, pad, norm", list(_cases()))
def test_the_plan_is_torchs_transform(kind, dims, pad, norm):
    x, ns, want = _input_and_torchs(kind, dims, pad, norm, SHAPE, torch.Generator().manual_seed(0))
    for shard in dims:
        try:
            split = (AxisShard(shard, balanced_lengths(SHAPE[shard], 2)),)
            plan = plan_fft(FftOp(dims, ns, norm, kind), SHAPE, split)
        except NoCarrier:
            continue
        got = x
        for step in plan.steps:
            if step.kind != "move":
                got = _one_d(step.kind, got, step)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-9), (shard, plan)
        assert plan.shape == want.shape, (shard, plan)
        (out,) = plan.out
        assert out.lengths == balanced_lengths(want.shape[out.dim], 2)


#: two mesh axes: (dim, ranks) each; the second split dim may lie outside the transform
MESHES = [((2, 2), (3, 2)), ((3, 3), (2, 2)), ((2, 2), (1, 2)), ((1, 2), (3, 3)), ((0, 2), (2, 2))]


def _mesh_cases():
    for (kind, dims, pad, norm), mesh in itertools.product(_cases(), MESHES):
        if any(d in dims for d, _ in mesh):
            yield kind, dims, pad, norm, mesh


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", [SHAPE, (1, 3, 8, 6)])
def test_the_pencil_is_torchs_transform(shape):
    """Two mesh axes (the pencil): the steps, moves skipped, are torch's transform; every move takes an
    axis from the dim it splits, with its rows there, onto a dim no other axis splits, with a row per
    rank; each axis moves at most twice; settled, no axis that moved ends on a dim the op never
    touches while a transformed dim could hold it."""
    g = torch.Generator().manual_seed(0)
    planned = 0
    for kind, dims, pad, norm, mesh in _mesh_cases():
        x, ns, want = _input_and_torchs(kind, dims, pad, norm, shape, g)
        axes = tuple(AxisShard(d, balanced_lengths(shape[d], p)) for d, p in mesh)
        try:
            plan = plan_fft(FftOp(dims, ns, norm, kind), shape, axes, settle=True)
        except NoCarrier:
            continue
        planned += 1
        where, moves, got = list(axes), [0, 0], x
        for step in plan.steps:
            if step.kind != "move":
                assert all(a.dim != step.dim for a in where), (kind, dims, mesh, plan)  # whole when transformed
                got = _one_d(step.kind, got, step)
                continue
            a = where[step.axis]
            assert (step.dim, step.src_lengths) == (a.dim, a.lengths), (kind, dims, mesh, plan)
            assert all(b.dim != step.dst for b in where) and min(step.dst_lengths) >= 1, (kind, dims, mesh, plan)
            where[step.axis] = AxisShard(step.dst, step.dst_lengths)
            moves[step.axis] += 1
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-9), (kind, dims, mesh, plan)
        assert tuple(where) == plan.out and plan.shape == want.shape and max(moves) <= 2
        for a, before, n in zip(where, axes, moves):
            assert a.lengths == (before.lengths if n == 0 else balanced_lengths(want.shape[a.dim], len(a.lengths)))
            if n and a.dim not in dims:  # parked outside: no transformed dim was free and long enough
                free = [d for d in dims if all(b.dim != d for b in where) and want.shape[d] >= len(a.lengths)]
                assert not free, (kind, dims, mesh, plan)
    assert planned > 100
