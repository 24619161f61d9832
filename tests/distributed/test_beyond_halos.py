"""Ops that need more than a halo along the sharded dim, on DomainTensors, against one device.

One spawn of 4 gloo ranks runs every case on groups of 2, 3 and 4 ranks (the sub-groups'
other ranks wait at a barrier), uneven rows throughout and one arbitrary partition:

- scans along the shard (``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin``,
  ties included): ``out`` wrong points at the prefix of the ranks before (or its order),
  ``grad_in`` wrong with ``out`` right at the gather's backward;
- matrix products with the shard on a row or batch dim, and ``F.prelu`` (channel weight):
  local, their weight gradients summed over the ranks.

Each case is compiled in the global view with ``aot_eager`` (``check_global_view``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.harness import check_global_view, run_ranks
from tests.passes.graphs import Lambda

WORLD_SIZES = (2, 3, 4)


def _extreme_sum(scan, dim):
    """Values plus indices of a running extreme: a wrong index shows in the output."""

    def fn(x):
        values, indices = scan(x, dim)
        return values + indices.to(values.dtype)

    return fn


SCANS = {
    "cumsum": lambda x: torch.cumsum(x, 2),
    "cumsum method, dtype float64": lambda x: x.cumsum(2, dtype=torch.float64).float(),
    "cumprod": lambda x: torch.cumprod(1 + 0.1 * x, dim=2),
    "logcumsumexp, negative dim": lambda x: torch.logcumsumexp(x, -2),
    "cummax values + indices": _extreme_sum(torch.cummax, 2),
    "cummin values + indices, ties": lambda x: _extreme_sum(torch.cummin, 2)(x.clamp(-0.3, 0.3)),
    "cummax with ties, method": lambda x: x.clamp(-0.3, 0.3).cummax(2).values,
    "cumsum along W: local": lambda x: x.cumsum(3),
    "cummax along W: local": lambda x: torch.cummax(x, 3)[0],
}


class TokenMatmul(nn.Module):
    """Tokens (sharded rows) times a weight, then a per-window batched product: both local."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6) / 3)
        self.v = nn.Parameter(torch.randn(1, 6, 4) / 3)

    def forward(self, x):  # x: [B, C, H, W] sharded along H
        t = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)  # [B, H, C*W]: H = tokens
        t = t[..., :5] @ self.w  # rows of a sharded, b replicated
        return torch.matmul(t.unsqueeze(2), self.v).squeeze(2)  # a batch dim sharded, v broadcast


class PReLUBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4)

    def forward(self, x):
        return self.act(self.conv(x))


def _models():
    models = {f"scan: {name}": Lambda(fn) for name, fn in SCANS.items()}
    models["matmul: tokens @ weight, batched"] = TokenMatmul()
    models["prelu after a conv"] = PReLUBlock()
    return models


def _run(rank, world_size):
    out = {}
    for P in WORLD_SIZES:
        group = dist.new_group(list(range(P))) if P < world_size else None
        if rank < P:
            torch.manual_seed(P)  # the same global tensor on every rank
            x = torch.randn(2, 3, 4 * P + 1, 5)
            res = {}
            for name, model in _models().items():
                res[name] = check_global_view(model, x, group=group)
            if P == 4:
                res["scan: cumsum, partition [3, 1, 9, 4]"] = check_global_view(
                    Lambda(SCANS["cumsum"]), torch.randn(2, 3, 17, 5), lengths=[3, 1, 9, 4]
                )
                res["scan: cummax, partition [3, 1, 9, 4]"] = check_global_view(
                    Lambda(SCANS["cummax values + indices"]), torch.randn(2, 3, 17, 5), lengths=[3, 1, 9, 4]
                )
            out[P] = {name: {k: ok for k, (ok, _) in checks.items()} for name, checks in res.items()}
        dist.barrier()
    return out


_RESULTS = {}


def _results():
    if not _RESULTS:
        _RESULTS["r"] = run_ranks(_run, max(WORLD_SIZES), timeout=400)
    return _RESULTS["r"]


@pytest.mark.timeout(430)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_match_one_device(P):
    failures = [
        (rank, name, checks)
        for rank, per_rank in enumerate(_results()[:P])
        for name, checks in per_rank[P].items()
        if not all(checks.values())
    ]
    assert not failures, failures
