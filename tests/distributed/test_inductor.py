"""A few cases through real Inductor (the sweep uses aot_eager for speed)."""

import pytest

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
