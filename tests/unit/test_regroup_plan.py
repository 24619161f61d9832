"""fxhalo.ops.moves.regroup_plan against a simulated all_to_all: every rank ends with exactly its new rows,
in its new order, for interleaved <-> block layouts and random permutations of the rows."""

from __future__ import annotations

import random

import pytest

from fxhalo.ops.moves import regroup_plan


def _simulate(src_rows, dst_rows):
    """Each rank's rows after the regroup, computed from every rank's plan as the collective would move them."""
    P = len(src_rows)
    plans = [regroup_plan(src_rows, dst_rows, r) for r in range(P)]
    out = []
    for me in range(P):
        received = [src_rows[s][i] for s in range(P) for i in plans[s][0][me]]  # rank order, as sent
        send, counts, order = plans[me]
        assert [len(plans[s][0][me]) for s in range(P)] == list(counts)
        out.append([received[i] for i in order])
    return out


def _blocks(n, P):
    cuts = [n * r // P for r in range(P + 1)]
    return [list(range(cuts[r], cuts[r + 1])) for r in range(P)]


def _interleaved(n, outer, P):
    block = n // outer
    return [[k * block + j for k in range(outer) for j in rows] for rows in _blocks(block, P)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("P", [1, 2, 3, 4, 5])
def test_regroup_reaches_the_new_rows(P):
    rng = random.Random(P)
    for n, outer in [(12, 2), (16, 2), (30, 3), (24, 4), (7 * P, 7)]:
        if n // outer < P:
            continue
        blocks, inter = _blocks(n, P), _interleaved(n, outer, P)
        assert _simulate(blocks, inter) == inter
        assert _simulate(inter, blocks) == blocks
        rows = list(range(n))
        rng.shuffle(rows)
        cuts = sorted(rng.sample(range(n + 1), P - 1)) if P > 1 else []
        bounds = [0, *cuts, n]
        shuffled = [rows[bounds[r] : bounds[r + 1]] for r in range(P)]
        assert _simulate(blocks, shuffled) == shuffled
