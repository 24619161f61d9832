"""Scans along the sharded dim (fxhalo/rules/scan.py, fxhalo/ops/scan.py) against one device.

For 2, 3 and 4 ranks (one spawn each), on uneven rows (4P+1 of them), every case is
compared forward and backward: ``out`` wrong points at the prefix (the totals of the
ranks before, or their order); ``grad_in`` wrong with ``out`` right at the backward of
the gather (a later rank's gradient not reaching an earlier rank's total).  Along
another dim the scans are local.  ``cummax`` along the sharded dim is refused.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import check_many_against_one_device, run_ranks
from tests.passes.graphs import Lambda

CASES = {
    "cumsum along the shard": lambda x: torch.cumsum(x, 2),
    "cumsum method, dtype float64": lambda x: x.cumsum(2, dtype=torch.float64).float(),
    "cumprod along the shard": lambda x: torch.cumprod(1 + 0.1 * x, dim=2),
    "logcumsumexp along the shard": lambda x: torch.logcumsumexp(x, -2),
    "cumsum along W: local": lambda x: x.cumsum(3),
    "cummax along W: local": lambda x: torch.cummax(x, 3)[0],
    "cummin along W: local": lambda x: x.cummin(3).values,
}


def _run(rank, world_size):
    import fxhalo

    torch.manual_seed(world_size)  # the same global tensor on every rank
    x = torch.randn(2, 3, 4 * world_size + 1, 5)
    cases = [(Lambda(fn), x, i) for i, fn in enumerate(CASES.values())]
    results = check_many_against_one_device(cases, shard_dim=2, options={"compiler": "aot_eager"})
    checks = {name: {k: ok for k, (ok, _) in r.items()} for name, r in zip(CASES, results)}
    torch._dynamo.reset()
    compiled = torch.compile(Lambda(lambda t: torch.cummax(t, 2)[0]), backend="domain_parallel")
    try:
        compiled(fxhalo.shard(x, 2))
        refusal = "ran"
    except fxhalo.FxHaloError as e:
        refusal = str(e)
    return checks, refusal


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_scans_match_one_device_and_cummax_along_the_shard_is_refused(world_size):
    per_rank = run_ranks(_run, world_size, timeout=180)
    failures = [
        (r, name, c) for r, (checks, _) in enumerate(per_rank) for name, c in checks.items() if not all(c.values())
    ]
    assert not failures, failures
    for _, refusal in per_rank:
        assert "running extreme along the sharded dim" in refusal and "Remedy" in refusal, refusal
