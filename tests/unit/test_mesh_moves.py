"""The planner of ``fxhalo.redistribute`` on a mesh (fxhalo/redistribute.py, ``plan_mesh_moves``), on one
process: every move takes an axis off the dim it splits, with its rows there, onto a dim no other axis
splits at that moment; the axes end where asked, balanced; a swap passes through a free dim; no free dim
is refused."""

import pytest

from fxhalo.domain import balanced_lengths
from fxhalo.errors import FxHaloError
from fxhalo.redistribute import plan_mesh_moves

SHAPE = (2, 4, 13, 10)


def _split(dims, sizes):
    return tuple((d, balanced_lengths(SHAPE[d], n)) for d, n in zip(dims, sizes))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "src, dst, sizes, count",
    [
        ((2, 3), (2, 3), (2, 2), 0),
        ((2, 3), (1, 3), (2, 2), 1),
        ((2, 3), (3, 1), (2, 3), 2),  # W's axis leaves first, then H's takes W
        ((2, 3), (3, 2), (2, 2), 3),  # a swap: one axis parks on a free dim
        ((2, 3), (3, 2), (2, 3), 3),
    ],
)
def test_moves_land_where_asked(src, dst, sizes, count):
    moves = plan_mesh_moves(SHAPE, _split(src, sizes), dst)
    where = list(_split(src, sizes))
    for m in moves:
        assert (m.dim, m.src_lengths) == where[m.axis]
        assert all(d != m.dst for d, _ in where) and min(m.dst_lengths) >= 1
        where[m.axis] = (m.dst, m.dst_lengths)
    assert [d for d, _ in where] == list(dst) and len(moves) == count
    for (d, lengths), n in zip(where, sizes):
        assert lengths == balanced_lengths(SHAPE[d], n) or (d, lengths) in _split(src, sizes)


@pytest.mark.timeout(60)
def test_a_swap_with_no_free_dim_is_refused():
    with pytest.raises(FxHaloError, match="two calls"):
        plan_mesh_moves((1, 1, 13, 10), _split((2, 3), (2, 2)), (3, 2))
    with pytest.raises(FxHaloError, match="one target dim per mesh axis"):
        plan_mesh_moves(SHAPE, _split((2, 3), (2, 2)), (2,))
