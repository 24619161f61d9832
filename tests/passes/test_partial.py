"""Partial sums (a product that contracts the shard) through the ops linear in them: one sum per chain.

``x^T @ x`` with the rows of ``x`` sharded leaves every rank a summand.  The pass keeps
it a summand through ops linear in it that do not make it larger, and sums it (one
``fxhalo.ops.moves.sum_partial``) before anything else and before the outputs.
Numbers against one device are in tests/distributed/test_beyond_halos.py.
"""

from __future__ import annotations

import pytest
import torch

from fxhalo.layout import Partial, sharding_of
from fxhalo.ops import moves
from tests.passes.graphs import passes_on, targets

X = torch.randn(2, 3, 8, 6)  # local slab, rows (dim 2) sharded


def gram(x):
    return x.transpose(-2, -1) @ x  # contracts the sharded rows: a partial sum


def sums(fn):
    gm, _ = passes_on(fn, X, shard_dim=2)
    return gm, targets(gm).count(moves.sum_partial)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: (gram(x) @ torch.ones(6, 2)).sum(),  # product, then a reduction: still one sum
        lambda x: (gram(x) * 2 - gram(x).neg()) / 3,  # scaled, added to another partial sum
        lambda x: torch.einsum("bcij,jk->bcik", gram(x), torch.ones(6, 4)).reshape(6, 24).t().mean(0),
        lambda x: torch.nn.functional.linear(gram(x), torch.ones(5, 6)).permute(3, 0, 1, 2)[1:].contiguous(),
    ],
)
def test_a_chain_of_linear_ops_costs_one_sum(fn):
    gm, n = sums(fn)
    assert n == 1
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (total,) = [n for n in gm.graph.nodes if n.target is moves.sum_partial]
    assert out.args[0][0] is total and sharding_of(total) is None  # summed right before the output


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "fn, before",
    [
        (lambda x: gram(x) + 1.0, "add"),  # a number added once per rank would count P times
        (lambda x: gram(x).exp(), "exp"),  # not linear
        (lambda x: 3 / gram(x), "truediv"),  # divides by the partial sum
        (lambda x: gram(x) * gram(x), "mul"),  # a product of two partial sums
        (lambda x: gram(x).unsqueeze(0).expand(4, 2, 3, 6, 6), "expand"),  # larger: sum the smaller tensor
        (lambda x: gram(x).to(torch.float64), "to"),  # a cast rounds per summand
        (lambda x: torch.nn.functional.linear(gram(x), torch.ones(5, 6), torch.ones(5)), "linear"),  # a bias
    ],
)
def test_other_ops_sum_their_partial_input_first(fn, before):
    gm, _ = sums(fn)
    total = next(n for n in gm.graph.nodes if n.target is moves.sum_partial)
    (user,) = total.users
    assert before in str(user.target) and not any(isinstance(sharding_of(n), Partial) for n in user.all_input_nodes)


@pytest.mark.timeout(120)
def test_the_partial_layout_is_recorded_until_the_sum():
    gm, _ = sums(lambda x: (gram(x) * 2).exp())
    layouts = {n.name: sharding_of(n) for n in gm.graph.nodes}
    assert isinstance(layouts["mul"], Partial) and layouts["exp"] is None
