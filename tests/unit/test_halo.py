"""plan_halo in one process: simulate every rank and the all_to_all, compare with the global picture.

The expected slab of rank r is, for each needed global row i, row i of the global
tensor if 0 <= i < N, else what the edge rule says (torch's F.pad semantics).
"""

import random

import pytest
import torch

from fxhalo import Edge, FxHaloError, plan_halo
from fxhalo.domain import _balanced_partition
from fxhalo.halo import needs_from_widths


def expected_row(i, n, edge):
    if 0 <= i < n:
        return i
    depth = -i if i < 0 else i - (n - 1)
    ext = edge.extent[0 if i < 0 else 1] if edge.extent else None
    if ext is not None and depth > ext:
        return ("fill", 0.0)
    return {
        "zeros": ("fill", 0.0),
        "constant": ("fill", edge.value),
        "replicate": 0 if i < 0 else n - 1,
        "reflect": -i if i < 0 else 2 * (n - 1) - i,
        "circular": i % n,
    }[edge.mode]


def simulate(partition, needs, edge):
    """Run every rank's plan on a 'tensor' whose rows are their global indices."""
    size = len(partition)
    plans = [plan_halo(partition, needs, r, edge) for r in range(size)]
    rows = [list(range(a, b)) for a, b in partition]
    send_bufs = [[rows[q][s + k] for s, n in p.send for k in range(n)] for q, p in enumerate(plans)]
    slabs = []
    for r, p in enumerate(plans):
        recv = []
        for q in range(size):
            off = sum(plans[q].send_splits[:r])
            recv += send_bufs[q][off : off + plans[q].send_splits[r]]
        assert len(recv) == p.rows_received == sum(p.recv_splits)
        slab = []
        for piece in p.pieces:
            if piece.kind == "fill":
                part = [("fill", piece.value)] * piece.length
            else:
                src = rows[r] if piece.kind == "local" else recv
                part = src[piece.start : piece.start + piece.length]
            slab += part[::-1] if piece.reverse else part
        slabs.append(slab)
    return plans, slabs


def check(partition, needs, edge):
    n = partition[-1][1]
    plans, slabs = simulate(partition, needs, edge)
    for r, ((s, e), slab) in enumerate(zip(needs, slabs)):
        assert slab == [expected_row(i, n, edge) for i in range(s, e)], (r, partition, needs, edge)
        # Minimal communication: exactly the needed rows that live on other ranks are received.
        a, b = partition[r]
        remote = [expected_row(i, n, edge) for i in range(s, e)]
        remote = [g for g in remote if not isinstance(g, tuple) and not a <= g < b]
        assert plans[r].rows_received == len(remote)
    # Everyone agrees on whether there is a collective.
    assert len({p.collective for p in plans}) == 1
    return plans


def test_symmetric_halo_sends_one_row_each_way():
    part = _balanced_partition(12, 3)
    plans = check(part, needs_from_widths(part, [(1, 1)] * 3), Edge("zeros"))
    assert [p.send_splits for p in plans] == [(0, 1, 0), (1, 0, 1), (0, 1, 0)]
    assert plans[0].pieces[0].kind == "fill" and plans[2].pieces[-1].kind == "fill"


def test_asymmetric_and_zero_widths():
    part = _balanced_partition(16, 4)
    plans = check(part, needs_from_widths(part, [(2, 0)] * 4), Edge("zeros"))
    assert [p.rows_received for p in plans] == [0, 2, 2, 2]
    assert all(p.collective for p in plans)


def test_no_halo_is_identity_without_collective():
    part = _balanced_partition(8, 2)
    plans = check(part, part, Edge("zeros"))
    assert all(p.is_identity and not p.collective for p in plans)


def test_negative_width_drops_local_rows():
    part = _balanced_partition(12, 3)
    plans = check(part, needs_from_widths(part, [(-1, 1)] * 3), Edge("zeros"))
    assert plans[1].pieces[0].kind == "local" and plans[1].pieces[0].start == 1


def test_multi_hop_halo_reaches_past_the_neighbour():
    part = _balanced_partition(8, 4)  # 2 rows per rank, halo of 5
    plans = check(part, needs_from_widths(part, [(5, 5)] * 4), Edge("zeros"))
    assert plans[0].recv_splits == (0, 2, 2, 1)


def test_circular_wraps_the_ring_with_two_ranks():
    part = _balanced_partition(6, 2)
    plans = check(part, needs_from_widths(part, [(2, 1)] * 2), Edge("circular"))
    # rank 0 needs rows 4,5 (left) and 3 (right), all from rank 1, in one chunk
    assert plans[0].recv_splits == (0, 3)


def test_reflect_on_a_tiny_edge_shard_fetches_from_the_next_rank():
    part = _balanced_partition(4, 4)  # one row per rank
    check(part, needs_from_widths(part, [(2, 2)] * 4), Edge("reflect"))


def test_single_rank_circular_is_local():
    part = _balanced_partition(5, 1)
    plans = check(part, needs_from_widths(part, [(2, 2)]), Edge("circular"))
    assert not plans[0].collective


def test_reflect_wider_than_the_tensor_is_refused():
    part = _balanced_partition(4, 2)
    with pytest.raises(FxHaloError, match="reflect padding of 4 rows"):
        plan_halo(part, needs_from_widths(part, [(4, 4)] * 2), 0, Edge("reflect"))


def test_unknown_edge_mode_is_refused():
    with pytest.raises(FxHaloError, match="unknown edge mode"):
        Edge("wrap")


def test_random_plans_match_the_global_picture():
    rng = random.Random(0)
    for _ in range(400):
        size = rng.randint(1, 5)
        n = size * rng.randint(1, 5) + (rng.randint(0, size - 1) if rng.random() < 0.3 else 0)
        part = _balanced_partition(n, size)
        mode = rng.choice(["zeros", "constant", "reflect", "replicate", "circular"])
        edge = Edge(mode, value=1.5, extent=rng.choice([None, (rng.randint(0, 2), rng.randint(0, 2))]))
        widths = []
        for _ in range(size):
            lo, hi = rng.randint(-1, 4), rng.randint(-1, 4)
            widths.append((lo, hi))
        needs = needs_from_widths(part, widths)
        if any(e < s for s, e in needs):
            continue
        limit = n - 1 if mode == "reflect" else n
        if mode in ("reflect", "circular") and any(s < -limit or e > n + limit for s, e in needs):
            continue
        check(part, needs, edge)


# -- a fused producer's rows: planned_exchange and takes_received_rows --------------------------------


def _windowed(x, plan):
    """A stand-in halo kernel: one exchange along dim 1 (``group_name`` is never used here), then a sum
    of three neighbouring rows."""
    from fxhalo.halo import halo_exchange

    ext = halo_exchange(x, 1, plan, "never-used", edge=plan.edge)
    return ext[:, :-2] + ext[:, 1:-1] + ext[:, 2:]


def test_planned_exchange_reports_the_kernels_plan_without_communicating():
    from fxhalo.halo import planned_exchange

    part = ((0, 4), (4, 8))
    plan = plan_halo(part, needs_from_widths(part, ((1, 1), (1, 1))), 1)
    assert planned_exchange(_windowed, (torch.zeros(2, 4), plan), {}) == (plan,)  # one plan per mesh axis
    assert planned_exchange(lambda x: x * 2, (torch.zeros(2, 4),), {}) is None  # no exchange at all


def test_received_rows_are_assembled_and_checked_against_the_kernels_needs():
    from fxhalo.halo import takes_received, takes_received_rows

    part = ((0, 4), (4, 8))
    needs = needs_from_widths(part, ((1, 1), (1, 1)))
    plan = plan_halo(part, needs, 1)  # rank 1: row 3 from rank 0, zeros past the end
    kernel = takes_received_rows(_windowed)
    assert takes_received(kernel) and not takes_received(_windowed)
    x = torch.arange(4.0, 8.0).expand(2, 4)
    got = kernel(x, plan, halo_rows=torch.full((2, 1), 3.0), halo_needs=(needs,))
    whole = torch.cat([torch.arange(8.0), torch.zeros(1)]).expand(2, 9)
    assert torch.equal(got, whole[:, 3:7] + whole[:, 4:8] + whole[:, 5:9])  # rows 3 .. 8 of it
    with pytest.raises(AssertionError, match="needs"):  # rows planned for another op
        kernel(x, plan, halo_rows=torch.full((2, 1), 3.0), halo_needs=(((0, 5), (3, 9)),))
    with pytest.raises(AssertionError, match="no halo exchange"):  # a kernel that never used them
        takes_received_rows(lambda x, plan: x)(x, plan, halo_rows=x, halo_needs=(needs,))
