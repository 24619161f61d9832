"""Propagation models on real ranks against one device: window partitions, graph breaks, the gather fallback.

Each check compares the forward slab ("out"), the input-gradient slab
("grad_in": a layout mistake in a reshape shows up here as rows from the wrong
rank) and the weight gradients summed over ranks.
"""

import warnings

import pytest
import torch
import torch.nn as nn

from tests.harness import check_against_one_device, run_ranks

WS = 2  # window size


class WindowModel(nn.Module):
    """conv -> window partition (B,C,H,W -> B*nH*nW, ws, ws, C) -> Linear -> reverse -> conv."""

    def __init__(self, c=4):
        super().__init__()
        self.conv_in = nn.Conv2d(2, c, 3, padding=1)
        self.mix = nn.Linear(c, c)
        self.conv_out = nn.Conv2d(c, 2, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        x = self.conv_in(x)
        b, c, h, w = x.shape
        win = x.view(b, c, h // WS, WS, w // WS, WS).permute(0, 2, 4, 3, 5, 1).reshape(-1, WS, WS, c)
        win = torch.relu(self.mix(win))
        x = win.view(b, h // WS, w // WS, WS, WS, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return self.conv_out(x)


class GraphBreakModel(nn.Module):
    """A graph break between two convs, with a replicated scale crossing it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3).view(1, 3, 1, 1))

    def forward(self, x):
        y = torch.relu(self.a(x))
        s = self.scale * 2  # replicated, shaped (1, C, 1, 1): it must stay replicated after the break
        torch._dynamo.graph_break()
        return self.b(y * s)


class SortModel(nn.Module):
    """A sort along the sharded dim has no rule: the gather fallback runs it on the global tensor.

    Its output is a (values, indices) tuple, both re-sharded; the values read the rows of
    other ranks, so a wrong gather or re-shard shows up in "out" and "grad_in".
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.sort(self.conv(x), dim=2).values)


class LogsumexpModel(nn.Module):
    """logsumexp over the sharded dim: the fallback's output is replicated (and is a graph output)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.logsumexp(self.conv(x), dim=2)


def _compare(model, x, fallback=None, replicated_output=False):
    options = {"compiler": "aot_eager"}
    if fallback:
        options["fallback"] = fallback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = check_against_one_device(model, x, options=options, replicated_output=replicated_output)
    warned = [str(w.message) for w in caught if "fallback='gather'" in str(w.message)]
    return {k: ok for k, (ok, _) in checks.items()}, warned


def _models(rank, world_size):
    torch.manual_seed(0)
    out = {}
    out["window"] = _compare(WindowModel(), torch.randn(2, 2, 4 * world_size, 6))
    out["graph_break"] = _compare(GraphBreakModel(), torch.randn(2, 2, 3 * world_size, 5))
    out["fallback_sort"] = _compare(SortModel(), torch.randn(1, 2, 3 * world_size, 4), fallback="gather")
    out["fallback_replicated"] = _compare(
        LogsumexpModel(), torch.randn(1, 2, 3 * world_size, 4), fallback="gather", replicated_output=True
    )
    return out


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return run_ranks(_models, request.param, timeout=300)


@pytest.mark.timeout(330)
@pytest.mark.parametrize("name", ["window", "graph_break", "fallback_sort", "fallback_replicated"])
def test_model_matches_one_device(results, name):
    for rank, per_rank in enumerate(results):
        checks, _ = per_rank[name]
        assert all(checks.values()), (rank, name, checks)


@pytest.mark.timeout(330)
def test_fallback_warns_with_op_line_and_bytes(results):
    for per_rank in results:
        _, warned = per_rank["fallback_sort"]
        assert warned and "torch.sort" in warned[0] and "test_propagate.py" in warned[0]
        assert "bytes per call" in warned[0]
