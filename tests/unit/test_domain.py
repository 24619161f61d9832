"""Domain arithmetic in one process (no process group needed: a Domain is plain data)."""

import pytest
import torch

from fxhalo import Domain, FxHaloError


def test_balanced_partition_gives_the_first_ranks_one_extra_row():
    assert Domain("g", 0, 4).partition(10) == ((0, 3), (3, 6), (6, 8), (8, 10))
    assert Domain("g", 0, 3).partition(12) == ((0, 4), (4, 8), (8, 12))


def test_bounds_neighbours_and_global_length():
    d = Domain("g", 2, 4)
    assert d.bounds(16) == (8, 12)
    assert (d.left, d.right, d.ring_left, d.ring_right) == (1, 3, 1, 3)
    edge = Domain("g", 0, 4)
    assert (edge.left, edge.right, edge.ring_left) == (None, 1, 3)
    assert Domain("g", 3, 4).right is None and Domain("g", 3, 4).ring_right == 0
    assert d.global_length(5, length=19) == 19  # given: used as it is (no collective)
    assert d.local_length(721) == 180 and Domain("g", 0, 4).local_length(721) == 181


def test_negative_shard_dim_counts_from_the_end():
    assert Domain("g", 0, 2, shard_dim=-2).dim_of(4) == 2
    assert Domain("g", 0, 2, shard_dim=-2).dim_of(5) == 3
    with pytest.raises(FxHaloError, match="does not exist"):
        Domain("g", 0, 2, shard_dim=3).dim_of(3)


def test_shards_off_the_partition_rule_are_refused_with_the_sizes():
    from fxhalo.domain import check_partition

    check_partition([181, 180, 180, 180], Domain("g", 0, 4), "test")  # 721 rows: the rule's split
    with pytest.raises(FxHaloError, match=r"hold \[180, 181, 180, 180\] rows .* as \[181, 180, 180, 180\]"):
        check_partition([180, 181, 180, 180], Domain("g", 0, 4), "test")


def test_a_kernel_traced_without_the_global_length_is_refused(monkeypatch):
    # While tracing, the all_gather that finds the length cannot run; assuming even shards
    # could be silently wrong (before: local * size).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(FxHaloError, match="without the global length"):
        Domain("g", 0, 4).global_length(5)
