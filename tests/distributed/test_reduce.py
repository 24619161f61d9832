"""Reductions, adaptive pools, softmax and losses over the sharded dim, against one device, for 2, 3 and 4 ranks.

They share the spawned group of ``test_norm.py`` (see ``reduce_cases.results``).
What a failure points to (each op has its own inputs, so a row names the op):
- ``out`` wrong: the global count, the reduced dims, or a tie rule (amax, max pooling);
- ``grad_<input>`` wrong with ``out`` right: a replicated result's gradient convention
  (divided by the group size at the graph output, summed again by the collective's
  backward), or which tied element gets the gradient of a maximum.
"""

import pytest
import torch

from tests.distributed.reduce_cases import failures, results
from tests.distributed.test_norm import COUNTED

WORLD_SIZES = [2, 3, 4]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reductions_softmax_and_losses_match_one_device(world_size):
    per_rank = results(world_size)
    assert not failures(per_rank, "reductions"), failures(per_rank, "reductions")
    assert sum(c["ops"] for c in per_rank[0]["reductions"]) >= 40


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", COUNTED)
def test_one_collective_per_reduction(world_size):
    for case in results(world_size)[0]["reductions"]:
        assert case["fw"] and len(case["fw"]) == len(case["kernels"]), case
        # on gloo a small sum (all_reduce_sum) and a small gather (all_gather_stacked: extrema, softmax
        # rows) travel by exchange, and so do their backwards
        assert set(case["fw"]) == {"all_to_all_single"}, case
        assert "all_gather_into_tensor" not in case["bw"] and "reduce_scatter_tensor" not in case["bw"], case
        assert len(case["bw"]) == len(case["fw"]) + case["buckets"], case  # + grad_sync's buckets


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce_sum_exchanges_small_tensors_on_gloo_and_is_the_same_on_every_rank(world_size):
    per_rank = results(world_size)
    small, large = per_rank[0]["sums"]
    # forward and backward: one exchange for the small tensor, one all_reduce for the large one
    assert small["collectives"] == ["all_to_all_single"] * 2, small["collectives"]
    assert large["collectives"] == ["all_reduce"] * 2, large["collectives"]
    for r, res in enumerate(per_rank):
        for got, first in zip(res["sums"], per_rank[0]["sums"]):
            assert got["sum_ok"] and got["grad_ok"], (r, got["numel"])
            assert torch.equal(got["sum"], first["sum"]), (r, got["numel"])  # bit-identical replicas
