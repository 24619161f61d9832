"""Sharding propagation through shape and indexing ops, on real Dynamo graphs, one process.

A simulated 4-rank domain (H sharded, 8 local rows of 32) is enough: propagation
needs no process group.
"""

import operator

import pytest
import torch

from fxhalo import FxHaloError
from fxhalo.layout import Sharded, sharding_of
from fxhalo.rules.shape import reshape_sharding
from tests.passes.graphs import Lambda, passes_on, targets


def output_sharding(model, *inputs, **overrides):
    gm, _ = passes_on(model, *inputs, **overrides)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [sharding_of(a) for a in out]


X = torch.randn(2, 3, 8, 6)  # local slab of a (2, 3, 32, 6) tensor on 4 ranks


@pytest.mark.parametrize(
    "fn, want",
    [
        (lambda x: x.permute(0, 2, 3, 1), Sharded(1, 8, 32)),
        (lambda x: x.transpose(2, 3), Sharded(3, 8, 32)),
        (lambda x: torch.movedim(x, 2, 0), Sharded(0, 8, 32)),
        (lambda x: x.unsqueeze(0), Sharded(3, 8, 32)),
        (lambda x: x.unsqueeze(-1), Sharded(2, 8, 32)),
        (lambda x: x.contiguous().flatten(0, 1), Sharded(1, 8, 32)),
        (lambda x: x.flatten(2), Sharded(2, 48, 192)),  # H merged with W (inside it)
        (lambda x: x.view(2, 3, 4, 2, 6), Sharded(2, 4, 16)),  # H -> (h, 2): h is sharded
        (lambda x: x.reshape(6, 8, 6), Sharded(1, 8, 32)),
        (lambda x: x[None].expand(2, 2, 3, 8, 6), Sharded(3, 8, 32)),
        (lambda x: x[:, 1:, :, ::2], Sharded(2, 8, 32)),
        (lambda x: x[..., 0], Sharded(2, 8, 32)),
        (lambda x: x[0], Sharded(1, 8, 32)),
        (lambda x: x[:, None], Sharded(3, 8, 32)),
        (lambda x: x.split(1, dim=1)[2], Sharded(2, 8, 32)),
        (lambda x: torch.chunk(x, 3, 3)[1], Sharded(2, 8, 32)),
        (lambda x: x.unbind(1)[0], Sharded(1, 8, 32)),
        (lambda x: torch.cat([x, x * 2], dim=1), Sharded(2, 8, 32)),
        (lambda x: torch.stack([x, x], dim=0), Sharded(3, 8, 32)),
        (lambda x: torch.stack([x, x], dim=-1), Sharded(2, 8, 32)),
        (lambda x: x.narrow(3, 1, 2), Sharded(2, 8, 32)),
        (lambda x: x.select(0, 1), Sharded(1, 8, 32)),
    ],
)
def test_shape_ops_follow_the_sharded_dim(fn, want):
    assert output_sharding(Lambda(fn), X) == [want]


def test_window_partition_and_reverse():
    ws = 2

    def partition(x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, ws, ws, c)

    def reverse(win, b, c, h, w):
        x = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    (windows,) = output_sharding(Lambda(partition), X)
    # (b, h/ws, w/ws) merged: the batch dim sits outside the sharded window rows.
    assert windows == Sharded(0, 2 * 4 * 3, 2 * 16 * 3, outer=2)
    (back,) = output_sharding(Lambda(lambda x: reverse(partition(x) * 2, 2, 3, 8, 6)), X)
    assert back == Sharded(2, 8, 32)


def _write_slab_into_replicated(x):
    buf = torch.zeros(2, 3, 8, 6)  # on the plain path a slab's shape: replicated
    buf[:, :, :, :] = x
    return buf


@pytest.mark.parametrize(
    "fn, op, match",
    [
        (lambda x: x[:, :, 1:], "operator.getitem", "indexes the sharded dim"),
        (lambda x: x[:, :, 0], "operator.getitem", "indexes the sharded dim"),
        (lambda x: x.narrow(2, 0, 4), "Tensor.narrow", "takes rows of the sharded dim"),
        (lambda x: torch.select(x, 2, 1), "torch.select", "takes rows of the sharded dim"),
        (lambda x: torch.cat([x, x], dim=2), "torch.cat", "concatenates along the sharded dim"),
        (lambda x: x.split(4, dim=2)[0], "Tensor.split", "splits along the sharded dim"),
        (lambda x: x.reshape(2, 3, 6, 8), "Tensor.reshape", "reshapes the sharded dim"),
        (lambda x, y: torch.cat([x, y], dim=1), "torch.cat", "not all sharded alike"),
        (lambda x: torch.roll(x, 1), "torch.roll", "rolls the flattened tensor"),
        (lambda x: torch.sort(x, dim=2).values, "torch.sort", "no rule"),
        (lambda x: torch.fft.fftn(x[:1, :1, :, :1]), "fftn", "no other dim can carry the shard"),
        (_write_slab_into_replicated, "operator.setitem", "into a tensor laid out as replicated"),
    ],
)
def test_refused_ops_name_the_op_line_and_remedy(fn, op, match):
    inputs = (X, X.clone()) if fn.__code__.co_argcount == 2 else (X,)
    overrides = {"xs[1]": None} if len(inputs) == 2 else {}  # the second forward argument is replicated
    with pytest.raises(FxHaloError, match=match) as err:
        output_sharding(Lambda(fn), *inputs, **overrides)
    msg = str(err.value)
    assert op in msg and "test_shape_rules.py" in msg and "Remedy:" in msg


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.view(2, 3, 48),
        lambda x: x.view(2, 3, 8, 6).permute(0, 2, 1, 3).reshape(2, 8, 18).view(2, 8, 3, 6),
    ],
)
def test_reshapes_that_keep_the_shard_are_allowed(fn):
    output_sharding(Lambda(fn), X)


def test_squeezing_a_one_row_shard_is_refused():
    with pytest.raises(FxHaloError, match="squeezes the sharded dim"):
        output_sharding(Lambda(lambda x: x.squeeze(2)), torch.randn(2, 3, 1, 6))
    assert output_sharding(Lambda(lambda x: x.squeeze(1)), torch.randn(2, 1, 8, 6)) == [Sharded(1, 8, 32)]


def test_reshape_factor_arithmetic():
    s = Sharded(1, 6, 24)
    assert reshape_sharding([2, 6, 4], [2, 3, 8], s) == Sharded(1, 3, 12)  # split, inner joins W
    assert reshape_sharding([2, 6, 4], [12, 4], s) == Sharded(0, 12, 48, outer=2)  # merged under batch
    assert reshape_sharding([2, 6, 4], [2, 24], s) == Sharded(1, 24, 96)  # merged with W
    assert reshape_sharding([2, 24], [2, 8, 3], Sharded(1, 24, 96)) == Sharded(1, 8, 32)  # and split again
    assert isinstance(reshape_sharding([2, 6, 4], [2, 4, 6], s), str)  # would cut H unevenly
    # one row per rank merged under the dim before it: the size-1 shard joins the dim being filled
    assert reshape_sharding([4, 1], [4], Sharded(1, 1, 4)) == Sharded(0, 4, 16, outer=4)


def test_a_window_split_with_one_window_per_rank_keeps_the_shard_on_the_window_index():
    """Swin's window partition of 4 rows in windows of 2 on 2 ranks: each rank's 2 rows are one window, so
    the local output dim of the window index has size 1.  From local sizes alone the shard went to the
    rows inside the window (dim 2, "2 of 4 rows" of a dim of size 2), and FuXi's window attention was then
    refused as a product of two sharded operands; the global shape says the size-1 dim holds the shard."""
    s = Sharded(1, 2, 4)
    local_in, local_out, global_out = [1, 2, 8, 16], [1, 1, 2, 4, 2, 16], [1, 2, 2, 4, 2, 16]
    assert reshape_sharding(local_in, local_out, s, global_out) == Sharded(1, 1, 2)
    assert reshape_sharding([1, 4, 8, 16], [1, 2, 2, 4, 2, 16], Sharded(1, 4, 8), global_out) == Sharded(1, 2, 4)
    # and back: the window index of local size 1 merges with the rows inside it, not with the batch before
    back = reshape_sharding(local_out, local_in, Sharded(1, 1, 2), [1, 4, 8, 16])
    assert back == Sharded(1, 2, 4)


@pytest.mark.parametrize(
    "fn, want",
    [
        (lambda x: torch.concat([x, x], 1), Sharded(2, 8, 32)),
        (lambda x: torch.concatenate([x, x], 3), Sharded(2, 8, 32)),
        (lambda x: x.expand_as(x), Sharded(2, 8, 32)),
        (lambda x: torch.moveaxis(x, 2, 0), Sharded(0, 8, 32)),
        (lambda x: torch.swapaxes(x, 2, 3), Sharded(3, 8, 32)),
        (lambda x: x.swapdims(2, 3), Sharded(3, 8, 32)),
        (lambda x: torch.tensor_split(x, 3, dim=1)[0], Sharded(2, 8, 32)),
        (lambda x: x.flatten(3).unflatten(3, (2, 3)), Sharded(2, 8, 32)),
        (lambda x: torch.fliplr(x), Sharded(2, 8, 32)),  # flips dim 1: local
        (lambda x: x.flipud(), Sharded(2, 8, 32)),  # flips dim 0: local
    ],
)
def test_other_spellings_follow_the_sharded_dim(fn, want):
    assert output_sharding(Lambda(fn), X) == [want]


def test_prelu_is_local_unless_its_channel_dim_is_sharded():
    """F.prelu's weight is per channel (dim 1): local along H, refused along the channels (MONAI's UNet)."""
    weight = torch.full((3,), 0.25)
    gm, changed = passes_on(lambda x: torch.nn.functional.prelu(x, weight), torch.randn(2, 3, 8, 6))
    assert changed == 0
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) == Sharded(2, 8, 32)
    with pytest.raises(FxHaloError, match="mixes values along dim 1"):
        passes_on(lambda x: torch.nn.functional.prelu(x, weight), torch.randn(2, 3, 8, 6), shard_dim=1)


@pytest.mark.parametrize(
    "fn, shard_dim, want",
    [
        (lambda x: x @ torch.ones(6, 5), 2, Sharded(2, 8, 32)),  # rows of a: tokens times weights
        (lambda x: torch.matmul(x, x.transpose(-2, -1)), 1, Sharded(1, 3, 12)),  # a batch (window) dim
        (lambda x: torch.bmm(x[0], x[1].transpose(-2, -1)), 1, Sharded(0, 3, 12)),
        (lambda x: torch.ones(5, 8) @ x, 3, Sharded(3, 6, 24)),  # columns of b
        (lambda x: x.__matmul__(torch.ones(6, 5)), 2, Sharded(2, 8, 32)),
        (lambda x: operator.imatmul(x, torch.ones(6, 6)), 2, Sharded(2, 8, 32)),
    ],
)
def test_matmul_is_local_unless_the_shard_is_contracted(fn, shard_dim, want):
    gm, changed = passes_on(fn, torch.randn(2, 3, 8, 6), shard_dim=shard_dim)
    assert changed == 0
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) == want


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x: x @ x.transpose(-2, -1), "only one may be"),
        (lambda x: torch.ones(3, 5, 8) @ x[0], "contracts the sharded dim"),
    ],
)
def test_matmul_refusals(fn, match):
    with pytest.raises(FxHaloError, match=match):
        passes_on(fn, torch.randn(2, 3, 8, 6))


def test_matmul_contracting_the_shard_of_both_operands_sums_once():
    """``x^T @ x`` with the rows sharded: each rank's product is a partial sum, summed by one all-reduce."""
    from fxhalo.ops import contract

    gm, changed = passes_on(lambda x: x.transpose(-2, -1) @ x, torch.randn(2, 3, 8, 6), shard_dim=2)
    assert changed == 1 and contract.product in targets(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) is None  # replicated after the sum


def test_einsum_along_an_interleaved_batch_keeps_it_interleaved():
    """Windows merged under the batch interleave each rank's rows (outer=2); an einsum per window keeps that
    layout.  Its output was recorded as one contiguous block, which the ops after it (a reshape back to the
    rows, an alignment) would then have read as the wrong rows."""
    fn = Lambda(lambda x: torch.einsum("bi,bi->b", x.reshape(16, 6), x.reshape(16, 6)))
    assert output_sharding(fn, torch.randn(2, 8, 6), shard_dim=1) == [Sharded(0, 16, 64, outer=2)]


def test_einsum_of_operands_sharded_along_different_indices_moves_them_onto_a_shared_one():
    """Queries and keys sharded along their tokens (i and j): both move onto the windows (b, the leftmost
    index every operand and the output share), where the product is local.  It was refused."""
    from fxhalo.ops import contract

    gm, changed = passes_on(
        Lambda(lambda x: torch.einsum("bhid,bhjd->bhij", x, x * 2)), torch.randn(4, 3, 8, 6), shard_dim=2
    )
    (node,) = [n for n in gm.graph.nodes if n.target is contract.product_on_carrier]
    assert changed == 1 and node.args[2] == ((2, 0, (8, 8, 8, 8)), (2, 0, (8, 8, 8, 8)))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) == Sharded(0, 1, 4)
