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
    return [run_case(c, rank, world_size, "inductor", seed=i) for i, c in enumerate(cases)]


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
