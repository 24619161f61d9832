"""The resampling rules on real Dynamo graphs, in one process, with a simulated 4-rank domain.

What is checked here is the decision, not the numbers (the multi-rank sweep checks
those): which nodes the geometry proves local and leaves as they are, which become
fxhalo kernels, the layout of their outputs, and the refusals.
"""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxhalo import FxHaloError
from fxhalo.layout import Sharded, sharding_of
from fxhalo.ops import adaptive_pool as adaptive_ops
from fxhalo.ops import conv_transpose as ct_ops
from fxhalo.ops import interpolate as interp_ops
from fxhalo.ops import pool as pool_ops
from tests.passes import graphs
from tests.passes.graphs import targets

SIZE = 4  # simulated ranks


def passes_on(fn, *inputs, shard_dim=2):
    """The rewritten graph module of ``fn`` on a simulated domain of SIZE ranks."""
    return graphs.passes_on(fn, *inputs, size=SIZE, shard_dim=shard_dim)[0]


def output_layouts(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [sharding_of(a) for a in out]


X = torch.randn(1, 2, 8, 6)  # local slab: 8 of 32 global rows


@pytest.mark.timeout(120)
def test_patchify_pool_is_proven_local_and_a_3x3_pool_gets_a_halo():
    gm = passes_on(lambda x: (F.max_pool2d(x, 2), F.max_pool2d(x, 3, 1, 1), F.avg_pool2d(x, (1, 3))), X)
    t = targets(gm)
    assert t.count(F.max_pool2d) == 1 and t.count(pool_ops.max_pool2d) == 1
    assert F.avg_pool2d in t  # window 1 along the sharded dim: local
    assert output_layouts(gm) == [Sharded(2, 4, 16), Sharded(2, 8, 32), Sharded(2, 8, 32)]


@pytest.mark.timeout(120)
def test_max_pool_indices_become_the_kernel_even_when_local_and_getitem_follows():
    gm = passes_on(lambda x: F.max_pool2d(x, 2, return_indices=True), X)
    assert pool_ops.max_pool2d in targets(gm)  # local windows, but the indices must be made global
    items = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert [sharding_of(n) for n in items] == [Sharded(2, 4, 16)] * 2


@pytest.mark.timeout(120)
def test_adaptive_pool_asks_each_rank_for_its_share():
    gm = passes_on(lambda x: F.adaptive_avg_pool2d(x, (12, 3)), X)
    assert adaptive_ops.adaptive_avg_pool2d in targets(gm)
    assert output_layouts(gm) == [Sharded(2, 3, 12)]


@pytest.mark.timeout(120)
def test_nearest_x2_is_local_and_bilinear_or_a_size_is_not():
    gm = passes_on(
        lambda x: (
            F.interpolate(x, scale_factor=2),
            F.interpolate(x, scale_factor=2, mode="bilinear"),
            F.interpolate(x, size=(64, 6)),
        ),
        X,
    )
    t = targets(gm)
    assert t.count(F.interpolate) == 1 and t.count(interp_ops.interpolate) == 2
    assert output_layouts(gm) == [Sharded(2, 16, 64)] * 3


@pytest.mark.timeout(120)
def test_conv_transpose_kernel_equal_to_stride_is_local_and_3_2_1_gets_a_halo():
    up = nn.ConvTranspose2d(2, 2, 2, stride=2)
    k3 = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1)
    gm = passes_on(lambda x: (up(x), k3(x)), X)
    t = targets(gm)
    assert t.count(torch.conv_transpose2d) == 1 and t.count(ct_ops.conv_transpose) == 1
    assert output_layouts(gm) == [Sharded(2, 16, 64)] * 2


@pytest.mark.timeout(120)
def test_batch_or_channel_sharding_leaves_pooling_alone():
    gm = passes_on(lambda x: (F.max_pool2d(x, 3), F.interpolate(x, scale_factor=1.5, mode="bicubic")), X, shard_dim=1)
    assert F.max_pool2d in targets(gm) and F.interpolate in targets(gm)


@pytest.mark.timeout(120)
def test_uneven_output_follows_the_partition_rule():
    k3 = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)  # 32 rows -> 63: 16, 16, 16, 15 on 4 ranks
    gm = passes_on(k3, X)
    out = next(n for n in gm.graph.nodes if n.target is ct_ops.conv_transpose)
    assert sharding_of(out) == Sharded(2, 16, 63)  # the simulated rank is rank 1
    assert out.kwargs["axes"][0].global_length == 32


@pytest.mark.timeout(120)
def test_output_with_fewer_rows_than_ranks_is_refused_with_the_sizes():
    pool = nn.MaxPool2d((8, 1), stride=(16, 1))  # 32 rows -> 2, for 4 ranks (each local slab -> 1)
    with pytest.raises(FxHaloError, match=r"global output length of 2 rows .* fewer than the 4 ranks"):
        passes_on(pool, X)


@pytest.mark.timeout(120)
def test_conv_transpose_over_sharded_channels_is_refused():
    with pytest.raises(FxHaloError, match="mixes the channels"):
        passes_on(nn.ConvTranspose2d(2, 2, 3), X, shard_dim=1)


@pytest.mark.timeout(120)
def test_antialias_is_refused():
    with pytest.raises(FxHaloError, match="antialias"):
        passes_on(lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), X)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "after",
    [
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        graphs.Lambda(lambda y: torch.flip(y, dims=(2,))),
        graphs.Lambda(lambda y: torch.nn.functional.pad(y, (0, 0, 1, 2)) * 2),
    ],
)
def test_an_op_right_after_a_rewritten_conv_reads_the_new_node(after):
    # Before: the resample and shift rules kept the conv node they saw while propagating;
    # the conv's rewrite replaced it, and the graph read an erased node ("used before defined").
    gm = passes_on(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), after), X)
    gm.graph.lint()
    kernels = [t for t in targets(gm) if getattr(t, "__module__", "").startswith("fxhalo.ops")]
    assert len(kernels) == 2


X1 = torch.randn(2, 3, 8)  # (N, C, L): L sharded, 8 of 32
X3 = torch.randn(1, 2, 8, 6, 4)  # (N, C, D, H, W): D sharded, 8 of 32


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "fn, x, kernel, want",
    [
        (lambda x: F.max_pool1d_with_indices(x, 3, 1, 1)[0], X1, pool_ops.max_pool1d, Sharded(2, 8, 32)),
        (lambda x: F.max_pool2d_with_indices(x, 2)[0], X, pool_ops.max_pool2d, Sharded(2, 4, 16)),
        (lambda x: F.max_pool3d_with_indices(x, 3, 1, 1)[0], X3, pool_ops.max_pool3d, Sharded(2, 8, 32)),
        (lambda x: F.avg_pool3d(x, 3, 1, 1), X3, pool_ops.avg_pool3d, Sharded(2, 8, 32)),
        (lambda x: F.adaptive_avg_pool3d(x, (12, 3, 2)), X3, adaptive_ops.adaptive_avg_pool3d, Sharded(2, 3, 12)),
        (
            lambda x: F.adaptive_max_pool1d_with_indices(x, 12)[0],
            X1,
            adaptive_ops.adaptive_max_pool1d,
            Sharded(2, 3, 12),
        ),
        (
            lambda x: F.adaptive_max_pool2d_with_indices(x, (12, 3))[0],
            X,
            adaptive_ops.adaptive_max_pool2d,
            Sharded(2, 3, 12),
        ),
        (
            lambda x: F.adaptive_max_pool3d_with_indices(x, (12, 3, 2))[0],
            X3,
            adaptive_ops.adaptive_max_pool3d,
            Sharded(2, 3, 12),
        ),
        # nearest x2: each rank's own rows give its output rows, so the op stays as it is
        (lambda x: F.upsample_nearest(x, scale_factor=2), X, F.upsample_nearest, Sharded(2, 16, 64)),
        (lambda x: F.upsample_bilinear(x, scale_factor=2), X, interp_ops.interpolate, Sharded(2, 16, 64)),
        (
            lambda x: F.conv_transpose3d(x, torch.ones(2, 2, 3, 3, 3), stride=2, padding=1, output_padding=1),
            X3,
            ct_ops.conv_transpose,
            Sharded(2, 16, 64),
        ),
    ],
)
def test_other_spellings_become_their_kernel(fn, x, kernel, want):
    gm = passes_on(fn, x)
    assert kernel in targets(gm)
    assert output_layouts(gm) == [want]
