"""Refusals: every rank raises the same clear FxHaloError, and nothing hangs.

All scenarios run inside one spawned group of ranks; each rank reports the
exception type and message it saw for each scenario.
"""

import pytest
import torch
import torch.nn as nn

from tests.harness import run_ranks


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=2)  # UNKNOWN-OP-LINE


class FlatRoll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 3) * 2  # ROLL-LINE


class BreaksOnRankZero(nn.Module):
    """Rank 0 takes a graph break the other ranks do not: their graphs differ."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if torch.distributed.get_rank() == 0:
            torch._dynamo.graph_break()
        return self.b(x)


class BatchNormMomentumNone(nn.Module):
    """BatchNorm(momentum=None) breaks the graph; Dynamo runs the whole bn call eagerly, on the local slab."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2, momentum=None)

    def forward(self, x):
        return self.bn(self.conv(x)) * 2


class ReplicatedBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        # Replicated, and as tall as the local slab: it broadcasts without complaint, but its
        # rows would line up with different global rows on every rank.
        self.register_buffer("bias_map", torch.arange(16.0).view(1, 1, 4, 4))

    def forward(self, x):
        return x + self.bias_map


def _compile(model, **options):
    return torch.compile(model, backend="domain_parallel", options={"compiler": "aot_eager", **options})


def _outcome(fn):
    torch._dynamo.reset()  # scenarios must not inherit each other's (rank-dependent) compile history
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "no error", ""


def _scenarios(rank, world_size):
    import fxhalo

    torch.manual_seed(0)
    out = {}
    out["unknown_op"] = _outcome(lambda: _compile(UnknownOp())(torch.randn(1, 2, 4, 4)))
    # 5 local rows, stride 2: the global output (5 rows) cannot be split over 2 ranks.
    out["stride_not_divisible"] = _outcome(
        lambda: _compile(nn.Conv2d(1, 1, 3, stride=2, padding=1))(torch.randn(1, 1, 5, 4)))
    # Different local shapes on different ranks must be refused on all ranks, not hang.
    rows = 4 + 2 * rank
    out["uneven_local_shapes"] = _outcome(lambda: _compile(nn.Conv2d(1, 1, 3, padding=1))(torch.randn(1, 1, rows, 4)))
    out["eager_call_at_graph_break"] = _outcome(lambda: _compile(BatchNormMomentumNone())(torch.randn(2, 1, 4, 4)))
    out["different_graph_breaks"] = _outcome(lambda: _compile(BreaksOnRankZero())(torch.randn(1, 1, 4, 4)))
    # Sharding the batch dim makes a conv local (no halo): it must run and match.
    torch._dynamo.reset()
    conv = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2 * world_size, 1, 4, 4)
    mine = _compile(conv, shard_dim=0)(fxhalo.shard(x, shard_dim=0))
    out["batch_sharded"] = ("ok", str(torch.allclose(mine, fxhalo.shard(conv(x), shard_dim=0), atol=1e-6)))
    out["flat_roll"] = _outcome(lambda: _compile(FlatRoll())(torch.randn(1, 1, 4, 4)))
    out["replicated_broadcast"] = _outcome(lambda: _compile(ReplicatedBroadcast())(torch.randn(1, 1, 4, 4)))
    out["shard_not_divisible"] = _outcome(lambda: fxhalo.shard(torch.randn(1, 1, 5, 4)))
    out["gather_uneven"] = _outcome(lambda: fxhalo.gather(torch.randn(1, 1, 2 + rank, 4)))
    out["unknown_option"] = _outcome(lambda: _compile(nn.Conv2d(1, 1, 1), colour="red")(torch.randn(1, 1, 4, 4)))
    # After all of that the group still works: a refused graph left no rank inside a collective.
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    out["group_alive"] = ("ok", str(t.item()))
    return out


@pytest.fixture(scope="module")
def outcomes():
    return run_ranks(_scenarios, 2, timeout=300)


def _all_ranks(outcomes, name):
    seen = [o[name] for o in outcomes]
    for kind, _ in seen:
        assert kind in ("FxHaloError", "BackendCompilerFailed"), seen
        assert kind == "FxHaloError", f"{name}: expected FxHaloError itself, got {seen}"
    return [msg for _, msg in seen]


@pytest.mark.timeout(300)
def test_unknown_op_names_op_line_and_remedy(outcomes):
    for msg in _all_ranks(outcomes, "unknown_op"):
        assert "torch.cumsum" in msg and "test_errors.py" in msg and "UNKNOWN-OP-LINE" in msg
        assert "Remedy:" in msg


@pytest.mark.timeout(300)
def test_stride_that_does_not_divide_is_refused_with_sizes(outcomes):
    for msg in _all_ranks(outcomes, "stride_not_divisible"):
        assert "global output length 5" in msg and "2 ranks" in msg
        assert "conv2d" in msg and "Remedy:" in msg


@pytest.mark.timeout(300)
def test_different_local_shapes_raise_on_every_rank(outcomes):
    msgs = _all_ranks(outcomes, "uneven_local_shapes")
    assert all("ranks compiled different graphs" in m for m in msgs)
    assert all("(1, 1, 4, 4)" in m and "(1, 1, 6, 4)" in m for m in msgs)


@pytest.mark.timeout(300)
def test_a_call_run_eagerly_at_a_graph_break_is_refused(outcomes):
    # Before: the BatchNorm ran eagerly with local statistics and the result was silently wrong.
    for msg in _all_ranks(outcomes, "eager_call_at_graph_break"):
        assert "computed outside the compiled graphs" in msg and "Remedy:" in msg


@pytest.mark.timeout(300)
def test_different_graph_breaks_raise_on_every_rank(outcomes):
    msgs = _all_ranks(outcomes, "different_graph_breaks")
    assert all("ranks compiled different graphs" in m for m in msgs)


@pytest.mark.timeout(300)
def test_batch_sharded_conv_is_local(outcomes):
    assert [o["batch_sharded"] for o in outcomes] == [("ok", "True")] * 2


@pytest.mark.timeout(300)
def test_roll_of_the_flattened_tensor_is_refused(outcomes):
    for msg in _all_ranks(outcomes, "flat_roll"):
        assert "ROLL-LINE" in msg and "rolls the flattened tensor" in msg


@pytest.mark.timeout(300)
def test_replicated_tensor_spanning_the_sharded_dim_is_refused(outcomes):
    for msg in _all_ranks(outcomes, "replicated_broadcast"):
        assert "bias_map" in msg and "broadcasts replicated tensor" in msg


@pytest.mark.timeout(300)
def test_shard_and_gather_name_the_sizes(outcomes):
    for msg in _all_ranks(outcomes, "shard_not_divisible"):
        assert "global length 5" in msg and "2 ranks" in msg
    for msg in _all_ranks(outcomes, "gather_uneven"):
        assert "[2, 3]" in msg


@pytest.mark.timeout(300)
def test_unknown_option_is_refused(outcomes):
    for msg in _all_ranks(outcomes, "unknown_option"):
        assert "colour" in msg


@pytest.mark.timeout(300)
def test_group_survives_the_refusals(outcomes):
    assert [o["group_alive"] for o in outcomes] == [("ok", "2.0")] * 2
