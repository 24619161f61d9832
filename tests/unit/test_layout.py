"""One dim split by several mesh axes (``fxhalo.layout``): each axis's entry is true in its own view, and
``whole_entry`` places each axis's factor in the global shape (what a reshape of the global shape needs).

Checked against the rows each rank really holds: H (axis 0) merged outside W (axis 1), uneven blocks,
with a batch outside both."""

import itertools

import pytest

from fxhalo.layout import Layout, Sharded, nesting, shared_dims, whole_entry


def _merged(B, H, W, hl, wl):
    """The layout of ``[B, H, W] -> [B*H*W]`` on the rank holding ``hl`` rows of H and ``wl`` of W."""
    local = B * hl * wl
    return Layout((Sharded(0, local, B * H * wl, outer=B), Sharded(0, local, B * hl * W, outer=B * hl)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("B, H, W, hl, wl", [(1, 5, 6, 3, 2), (2, 4, 7, 2, 4), (3, 6, 6, 1, 5)])
def test_whole_entries_place_each_factor(B, H, W, hl, wl):
    layout = _merged(B, H, W, hl, wl)
    assert shared_dims(layout) == {0: (0, 1)}
    if hl == 1:  # one row of H per rank: the two entries cannot tell which axis is outside
        assert nesting(layout, 0) is None
        return
    assert nesting(layout, 0) == (0, 1)
    h, w = whole_entry(layout, 0), whole_entry(layout, 1)
    n = B * H * W
    assert (h.global_length, h.outer) == (n, B)  # H's factor: B blocks outside it
    assert (w.global_length, w.outer) == (n, B * H)  # W's factor: B*H blocks outside it (H at its global size)


@pytest.mark.timeout(30)
def test_each_view_counts_this_ranks_rows():
    """In the h axis's view (W at this rank's share) the rank holds one block; in the w axis's view (H at
    this rank's share) one slice of each of ``hl`` blocks: both count the rows the rank holds."""
    B, H, W = 2, 5, 7
    for (h0, h1), (w0, w1) in itertools.product([(0, 3), (3, 5)], [(0, 4), (4, 7)]):
        rows = [(b, h, w) for b in range(B) for h in range(h0, h1) for w in range(w0, w1)]
        layout = _merged(B, H, W, h1 - h0, w1 - w0)
        assert all(s.local == len(rows) for s in layout.axes)
        # the w axis's view: outer blocks of W rows each, this rank's slice of each
        s = layout.axes[1]
        assert s.outer * (w1 - w0) == len(rows) and s.global_length // s.outer == W
