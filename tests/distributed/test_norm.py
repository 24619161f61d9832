"""Distributed normalisation against one device, for 2, 3 and 4 ranks (one spawned group per world size).

What a failure points to (each op has its own inputs, so a row names the op):
- ``out`` wrong: the statistics (a count, a dim left out of the reduction, the merge);
- ``grad_<input>`` wrong while ``out`` is right: the cross-rank terms of the backward,
  i.e. the statistics' gradients were not summed over the ranks (the bug of an
  all_reduce whose backward is the identity);
- ``param ... grad`` wrong: the affine terms, or the partial-gradient convention;
- ``buffer running_*`` wrong: the running-statistics update (the unbiased variance
  must use the *global* count).
"""

import pytest

from tests.distributed.reduce_cases import failures, results

WORLD_SIZES = [2, 3, 4]
#: where the spawn counts AOTAutograd's collectives (``aot_eager``); 3 and 4 ranks run the graph eagerly
COUNTED = [2]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_norms_match_one_device(world_size):
    per_rank = results(world_size)
    assert not failures(per_rank, "norms"), failures(per_rank, "norms")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mean_1e3_std_1_stays_within_fp32_tolerance_of_float64(world_size):
    norms = results(world_size)[0]["norms"][0]
    stable = {label: err for label, err in norms["errors"].items() if label.startswith("1e3")}
    assert len(stable) == 6 and norms["ok"], norms["failed"]
    # Where the fp32 one-device result is ~4e-5 off, ours stays near fp32 rounding.
    assert max(stable.values()) < 1e-5, stable


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", COUNTED)
def test_one_collective_per_norm_in_the_forward(world_size):
    for case in results(world_size)[0]["norms"]:
        assert case["fw"] and len(case["fw"]) == len(case["kernels"]), case  # one collective per fxhalo kernel
        assert set(case["fw"]) == {"all_to_all_single"}, case  # the statistics' sum, by exchange on gloo
        # the backward sums the statistics' gradients once, and grad_sync sums the parameters'
        assert len(case["bw"]) == len(case["fw"]) + case["buckets"], case
    kernels = results(world_size)[0]["norms"][0]["kernels"]
    assert kernels.count("norm.group_norm") == 5 and kernels.count("norm.layer_norm") == 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_norm_and_the_next_halo_ops_rows_share_one_exchange(world_size):
    """fxhalo.passes.fuse: exact against one device (forward, input and weight gradients, two
    steps, uneven rows), and one collective per fused norm + halo op, forward and backward."""
    case = results(world_size)[0]["fused"]
    per_rank = results(world_size)
    assert all(r["fused"]["ok"] for r in per_rank), [r["fused"]["failed"][:6] for r in per_rank]
    # 9 GroupNorms, 2 InstanceNorms; the halo ops: convs, an average pool, a bilinear upsample
    assert case["kernels"].count("norm.group_norm_exchange") == 11, case["kernels"]
    assert case["kernels"].count("norm.batch_norm_exchange") == 2, case["kernels"]  # a conv, a transposed conv
    assert case["kernels"].count("norm.layer_norm_exchange") == 1, case["kernels"]
    assert case["kernels"].count("norm.group_norm") == 2  # the dropout one, the max pool's
    assert not {"norm.instance_norm", "norm.batch_norm", "norm.layer_norm"} & set(case["kernels"])
    if world_size not in COUNTED:
        return
    # 14 fused exchanges, and each unfused norm's sum plus its halo op's exchange
    assert len(case["fw"]) == 14 + 2 * 2 and set(case["fw"]) == {"all_to_all_single"}, case["fw"]
    assert len(case["bw"]) == len(case["fw"]) + case["buckets"], case["bw"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_eager_rms_norm_over_the_sharded_dim_matches_one_device(world_size):
    per_rank = results(world_size)
    assert all(r["eager_rms_norm"]["ok"] for r in per_rank), [r["eager_rms_norm"] for r in per_rank]
