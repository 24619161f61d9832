"""A few cases through real Inductor (the sweeps use aot_eager for speed): convolutions, and an FNO block
with attention over its tokens (complex tensors through the moves of the shard)."""

import pytest
import torch

from tests.harness import run_ranks


def _inductor_cases(rank, world_size):
    from tests.distributed.conv_cases import ConvCase, run_case

    cases = [
        # the downsample a fixed (k - s) // 2 halo gets wrong: kernel 3, stride 2, padding 1, reflect edges
        ConvCase(2, 2, 2, 3, (3, 3), (2, 2), (1, 1), 1, "reflect", 1, True, 2, (4, 6)),
        # dilated, even kernel, circular ring, 1-D
        ConvCase(1, 2, 2, 2, (4,), (1,), (2,), 3, "circular", 2, True, 1, (6,)),
        # depthwise 3-D with 'same' padding and a halo wider than a shard (2 rows per rank, reach 4)
        ConvCase(3, 2, 2, 2, (5, 3, 3), (1, 1, 1), (1, 1, 1), "same", "zeros", 2, False, 1, (2, 3, 3)),
    ]
    return [run_case(c, rank, world_size, "inductor", seed=i) for i, c in enumerate(cases)] + _norm_then_halo(rank)


def _norm_then_halo(rank):
    """Norms whose statistics ride with the next halo op's rows, then GELU and that op, through Inductor:
    exact, and each halo ``cat`` read by a convolution laid out channels-last by fxhalo's post-grad pass
    (``fxhalo.passes.cat_layout``), counted over the forward and backward graphs."""
    import torch._inductor.config as inductor_config
    import torch.nn as nn

    import fxhalo.passes.cat_layout as cat_layout
    from tests.harness import check_many_against_one_device, check_many_global_view

    def block(norm, op):
        return nn.Sequential(norm, nn.GELU(), op)

    torch.manual_seed(0)
    cases = [
        (block(nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3, padding=1)), torch.randn(2, 4, 8, 6), 0),
        (block(nn.GroupNorm(2, 4, affine=False), nn.Conv2d(4, 3, 3, stride=2, padding=1)), torch.randn(1, 4, 8, 5), 1),
        (
            block(nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 2, (3, 1), padding=(2, 0), dilation=2)),
            torch.randn(2, 4, 8, 3),
            2,
        ),
        (block(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)), torch.randn(2, 4, 6, 4), 3),
    ]
    made = []
    counted = cat_layout.channels_last_cats

    def counting(graph, is_inference):
        made.append(counted(graph, is_inference))
        return made[-1]

    cat_layout.channels_last_cats = counting
    try:
        with inductor_config.patch(force_disable_caches=True):
            results = check_many_against_one_device(cases, options={"compiler": "inductor"})
    finally:
        cat_layout.channels_last_cats = counted
    # Where the backend compiles Inductor's C++ without GCC's loop splitting (fxhalo.passes.cpp_flags), the
    # norm's statistics ride with the max pool's rows; with it, GCC 12 miscompiled this backward (without
    # the flag the max pool stays unfused: tests/passes/test_cpp_flags.py checks that decision).
    pooled = check_many_global_view(
        [(_NormThenPoolAndConv(), torch.randn(2, 1, 45, 32), None)], options={"compiler": "inductor"}
    )
    return [{"ok": all(ok for ok, _ in r.values()), "case": i, "checks": r} for i, r in enumerate(results + pooled)] + [
        {"ok": sum(made) >= 3, "channels_last_cats": made}
    ]


class _NormThenPoolAndConv(torch.nn.Module):
    """SkipUNet's pattern whose backward GCC 12's loop splitting miscompiled under Inductor when the norm's
    statistics rode with the max pool's rows (45 rows: 23 + 22, rank 0 sends its last row for the pool):
    the norm's output is read by a max pool and by a conv (``fxhalo.passes.cpp_flags``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.InstanceNorm2d(4, affine=True)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        s = torch.nn.functional.silu(self.norm(self.conv1(x)))
        pooled = torch.nn.functional.max_pool2d(s, 2)
        return torch.cat([torch.nn.functional.interpolate(pooled, size=s.shape[-2:]), self.conv2(s)], 1)


@pytest.mark.timeout(600)
def test_inductor_matches_one_device():
    per_rank = run_ranks(_inductor_cases, 2, timeout=540)
    for rank, results in enumerate(per_rank):
        assert all(r["ok"] for r in results), (rank, results)


def _beyond_halo_cases(rank, world_size):
    import torch.nn as nn

    from tests.beyond_models import FNOBlock, TokenAttention
    from tests.harness import check_many_global_view

    torch.manual_seed(0)
    fno = nn.Sequential(nn.Conv2d(3, 8, 1), FNOBlock(8, 4, 4), FNOBlock(8, 4, 4), nn.Conv2d(8, 1, 1))
    cases = [
        (fno, torch.randn(1, 3, 32, 32), None),
        (nn.Sequential(FNOBlock(8), TokenAttention(8, 4)), torch.randn(1, 8, 9, 6), None),
    ]
    results = check_many_global_view(cases, options={"compiler": "inductor"})
    return [{name: ok for name, (ok, _) in r.items()} for r in results]


@pytest.mark.timeout(600)
def test_fno_and_attention_through_inductor_match_one_device():
    """Complex tensors through the moves of the shard, forward and backward, compiled by Inductor (torch's
    own Inductor compile of the benchmark's FNO in one process fails in torch 2.13; fxhalo's does not)."""
    per_rank = run_ranks(_beyond_halo_cases, 2, timeout=540)
    for rank, results in enumerate(per_rank):
        assert all(all(r.values()) for r in results), (rank, results)
