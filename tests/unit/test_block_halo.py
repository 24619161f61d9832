"""The block exchange on a mesh (fxhalo.block_halo) against indexing the global tensor, in one process.

Every rank of a ``p x q`` (or ``p x q x r``) mesh is a thread; the all_to_all is a stand-in that routes the
threads' buffers by their split sizes (what the real collective does), so the planner and
the assembly are checked without a process group, on many cases: uneven blocks, halos of
different widths on each side and rank, halos wider than a neighbour's block (multi-hop),
negative halos (a rank dropping rows), and every edge along each axis (zeros, a constant,
reflect, replicate, circular).  The reference is the global tensor indexed directly: along
each axis, the global row each needed row is (``Edge.source``), or a fill; a value is fill
when any axis's row is (fills of different values meeting in a corner are refused).  The real collective runs in
``tests/distributed/test_mesh.py``.
"""

from __future__ import annotations

import itertools
import math
import random
import threading

import pytest
import torch

from fxhalo.block_halo import block_exchange, plan_block
from fxhalo.halo import Edge, plan_halo


class _Router:
    """all_to_all_single among threads: each posts its buffer and split sizes, then takes its pieces."""

    def __init__(self, size: int):
        self.size = size
        self.posted = [None] * size
        self.barrier = threading.Barrier(size)
        self.local = threading.local()

    def __call__(self, buffer, recv_sizes, send_sizes, group_name):
        rank = self.local.rank
        self.posted[rank] = (buffer, list(send_sizes))
        self.barrier.wait()
        pieces = []
        for q in range(self.size):
            buf, sizes = self.posted[q]
            start = sum(sizes[:rank])
            assert sizes[rank] == recv_sizes[q], (q, rank, sizes[rank], recv_sizes[q])
            pieces.append(buf[start : start + sizes[rank]])
        self.barrier.wait()
        return torch.cat(pieces)


def _partition(n: int, parts: list[int]) -> tuple[tuple[int, int], ...]:
    bounds = [0, *itertools.accumulate(parts)]
    assert bounds[-1] == n
    return tuple(zip(bounds[:-1], bounds[1:]))


def _reference(x, dims, needs, edges, coords):
    """The extended block of the rank at ``coords``, straight from the global ``x``."""
    sources = []
    for d, need, edge, c in zip(dims, needs, edges, coords):
        n = x.shape[d]
        s, e = need[c]
        sources.append([i if 0 <= i < n else edge.source(i, n) for i in range(s, e)])
    out = torch.empty([x.shape[0], *(len(src) for src in sources)])
    for idx in itertools.product(*(range(len(src)) for src in sources)):
        rows = [src[i] for src, i in zip(sources, idx)]
        fills = [r for r in rows if isinstance(r, float)]
        out[(slice(None), *idx)] = fills[0] if fills else x[(slice(None), *rows)]
    return out


def _case(rng: random.Random):
    shape = rng.choice([(2, 2), (2, 3), (3, 2), (3, 1), (1, 3), (2, 2, 2), (1, 2, 3)])
    fill = rng.choice([0.0, 1.5])  # one fill value for every axis, as one op has
    lengths, parts, needs, edges = [], [], [], []
    for p in shape:
        blocks = [rng.randint(1, 4) for _ in range(p)]
        n = sum(blocks)
        part = _partition(n, blocks)
        mode = rng.choice(["constant", "reflect", "replicate", "circular"])
        wide = rng.random() < 0.3
        widths = [
            (rng.randint(-1 if b > 1 else 0, 5 if wide else 2), rng.randint(-1 if b > 1 else 0, 5 if wide else 2))
            for b in blocks
        ]
        if mode == "reflect":  # torch's reflect needs fewer rows than the tensor has
            widths = [(min(lo, n - 1), min(hi, n - 1)) for lo, hi in widths]
        if mode == "circular":
            widths = [(min(lo, n), min(hi, n)) for lo, hi in widths]
        lengths.append(n)
        parts.append(part)
        needs.append(tuple((a - lo, b + hi) for (a, b), (lo, hi) in zip(part, widths)))
        edges.append(Edge(mode, fill))
    return shape, lengths, parts, needs, edges


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(40))
def test_block_exchange_matches_indexing_the_global_tensor(seed, monkeypatch):
    rng = random.Random(seed)
    shape, lengths, parts, needs, edges = _case(rng)
    x = torch.arange(2.0 * math.prod(lengths)).reshape(2, *lengths) + 1  # [C, *spatial]: no value is a fill
    dims = tuple(range(1, len(lengths) + 1))
    coords = tuple(itertools.product(*(range(p) for p in shape)))
    router = _Router(len(coords))
    monkeypatch.setattr(torch.ops._c10d_functional, "all_to_all_single", router)
    monkeypatch.setattr(torch.ops._c10d_functional, "wait_tensor", lambda t: t)
    results, errors = {}, []

    def rank(r: int, c: tuple[int, ...]):
        router.local.rank = r
        try:
            block = x
            for d, part, i in zip(dims, parts, c):
                block = block.narrow(d, part[i][0], part[i][1] - part[i][0])
            plans = tuple(plan_halo(part, need, i, edge) for part, need, i, edge in zip(parts, needs, c, edges))
            exchanges = [(d, plan, edge) for d, plan, edge in zip(dims, plans, edges)]
            results[c] = block_exchange(block, exchanges, "router", coords)
        except BaseException as e:  # reported below; the barrier breaks so no thread waits forever
            errors.append((c, e))
            router.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r, c)) for r, c in enumerate(coords)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    for c in coords:
        want = _reference(x, dims, needs, edges, c)
        assert torch.equal(results[c], want), (c, shape, needs, edges)


def test_the_plan_sends_each_value_once_and_no_fill():
    """2 x 2 mesh, 4 x 4 blocks, a halo of 1 with zeros past the edges: rank 3 (bottom right) receives one
    row of 4 from above, one column of 4 from the left and the corner: 9 values; it sends the same."""
    part = ((0, 4), (4, 8))
    need = ((-1, 5), (3, 9))
    coords = ((0, 0), (0, 1), (1, 0), (1, 1))
    plans = (plan_halo(part, need, 1), plan_halo(part, need, 1))
    plan = plan_block(plans, coords)
    cells = [c.kind for c in plan.cells]
    assert cells == ["recv", "recv", "fill", "recv", "local", "fill", "fill", "fill", "fill"]
    assert plan.recv_cells == (1, 1, 1, 0) and plan.send_cells == (1, 1, 1, 0)
    assert sum(r[0][1] * r[1][1] for r in plan.send) == 9


def test_corners_of_different_fills_are_refused():
    from fxhalo.errors import FxHaloError

    part, need = ((0, 4), (4, 8)), ((-1, 5), (3, 9))
    plans = (plan_halo(part, need, 0, Edge("constant", 1.0)), plan_halo(part, need, 0))
    with pytest.raises(FxHaloError, match="different fill values"):
        plan_block(plans, ((0, 0), (0, 1), (1, 0), (1, 1)))
