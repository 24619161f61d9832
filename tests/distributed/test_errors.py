"""Refusals: every rank raises the same clear FxHaloError, and nothing hangs.

All scenarios run inside one spawned group of ranks; each rank reports the
exception type and message it saw for each scenario.
"""

import pytest
import torch
import torch.nn as nn

from tests.harness import check_against_one_device, run_ranks


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.sort(self.conv(x), dim=2).values  # UNKNOWN-OP-LINE


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        torch._dynamo.graph_break()
        return self.conv(x) * 2


class BreakInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.head = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.head(self.inner(x))


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
    # 2 local rows, stride 4: the global output has 1 row, too few for 2 ranks.
    out["too_few_rows"] = _outcome(lambda: _compile(nn.Conv2d(1, 1, 3, stride=4, padding=1))(torch.randn(1, 1, 2, 4)))
    # Local shapes off the partition rule must be refused on all ranks, not hang.
    rows = 4 + 2 * rank
    out["uneven_local_shapes"] = _outcome(lambda: _compile(nn.Conv2d(1, 1, 3, padding=1))(torch.randn(1, 1, rows, 4)))
    out["eager_call_at_graph_break"] = _outcome(lambda: _compile(BatchNormMomentumNone())(torch.randn(2, 1, 4, 4)))
    out["different_graph_breaks"] = _outcome(lambda: _compile(BreaksOnRankZero())(torch.randn(1, 1, 4, 4)))
    # Sharding the batch dim makes a conv local (no halo): it must run and match.
    torch._dynamo.reset()
    conv = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2 * world_size, 1, 4, 4)
    mine = _compile(conv, shard_dim=0)(fxhalo.domain.shard(x, shard_dim=0))
    out["batch_sharded"] = ("ok", str(torch.allclose(mine, fxhalo.domain.shard(conv(x), shard_dim=0), atol=1e-6)))
    out["flat_roll"] = _outcome(lambda: _compile(FlatRoll())(torch.randn(1, 1, 4, 4)))
    out["replicated_broadcast"] = _outcome(lambda: _compile(ReplicatedBroadcast())(torch.randn(1, 1, 4, 4)))
    out["shard_uneven"] = fxhalo.domain.shard(torch.randn(1, 1, 5, 4)).shape[2]
    # After a graph break inside a submodule, Dynamo passes that module's parameters as
    # '___stack0._parameters[...]': they are parameters, not eager results.
    torch.manual_seed(1)  # the same weights on every rank (the scenarios above drew rank-dependent sizes)
    try:
        checks = check_against_one_device(BreakInside(), torch.randn(1, 1, 8, 4), options={"compiler": "aot_eager"})
        out["break_inside_submodule"] = sorted(k for k, (ok, _) in checks.items() if not ok)
    except Exception as e:  # noqa: BLE001
        out["break_inside_submodule"] = f"{type(e).__name__}: {e}"
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
        assert "torch.sort" in msg and "test_errors.py" in msg and "UNKNOWN-OP-LINE" in msg
        assert "Remedy:" in msg


@pytest.mark.timeout(300)
def test_fewer_output_rows_than_ranks_is_refused_with_sizes(outcomes):
    for msg in _all_ranks(outcomes, "too_few_rows"):
        assert "global output length of 1 rows" in msg and "fewer than the 2 ranks" in msg
        assert "conv2d" in msg and "Remedy:" in msg


@pytest.mark.timeout(300)
def test_local_shapes_off_the_partition_rule_raise_on_every_rank(outcomes):
    msgs = _all_ranks(outcomes, "uneven_local_shapes")
    assert all("[4, 6]" in m and "[5, 5]" in m and "partition rule" in m for m in msgs)


@pytest.mark.timeout(300)
def test_parameters_of_a_module_on_dynamos_stack_are_parameters(outcomes):
    # Before the fix they were refused as '___stack0' eager results.
    assert [o["break_inside_submodule"] for o in outcomes] == [[]] * 2


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
def test_shard_follows_the_partition_rule_and_gather_names_the_sizes(outcomes):
    assert [o["shard_uneven"] for o in outcomes] == [3, 2]
    for msg in _all_ranks(outcomes, "gather_uneven"):
        assert "[2, 3]" in msg and "[3, 2]" in msg


@pytest.mark.timeout(300)
def test_unknown_option_is_refused(outcomes):
    for msg in _all_ranks(outcomes, "unknown_option"):
        assert "colour" in msg


@pytest.mark.timeout(300)
def test_group_survives_the_refusals(outcomes):
    assert [o["group_alive"] for o in outcomes] == [("ok", "2.0")] * 2
