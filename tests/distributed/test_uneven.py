"""Uneven shards: every rule, on global lengths the rank count does not divide.

The partition rule gives the first ``N % P`` ranks one extra row, for inputs and for
every op's output.  Each case below is one op reading its own input (so that Dynamo's trace of each
local slab is consistent, see docs/concepts.md); the ops are compiled side by side as
one graph per length (two: slab and replicated outputs) and each is compared with one
device: forward slab, input gradient, and full weight gradients on every rank.  One
spawned group per world size runs them all, for each global length.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.distributed.resample_cases import Op
from tests.harness import check_many_against_one_device, run_ranks, sweep_compiler


def _cases():
    """``(name, module factory, replicated output)``; factories, so that each case seeds its own weights."""
    return [
        ("conv k3 p1", lambda: nn.Conv2d(2, 3, 3, padding=1), False),
        ("conv k3 s2 p1", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), False),
        ("conv k4 same", lambda: nn.Conv2d(2, 3, 4, padding="same"), False),
        ("conv k3 d2 reflect", lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"), False),
        ("conv k3 valid", lambda: nn.Conv2d(2, 3, 3), False),
        ("conv k3 circular", lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), False),
        ("convT k3 s2 p1 op1", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), False),
        ("convT k3 s2 p1", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), False),
        ("max_pool k3 s2 p1 ceil", lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), False),
        ("avg_pool k2", lambda: nn.AvgPool2d(2, ceil_mode=True), False),
        ("bilinear x1.5", lambda: Op(F.interpolate, scale_factor=1.5, mode="bilinear", align_corners=False), False),
        ("bicubic align x2", lambda: Op(F.interpolate, scale_factor=2.0, mode="bicubic", align_corners=True), False),
        ("nearest-exact x0.5", lambda: Op(F.interpolate, scale_factor=0.5, mode="nearest-exact"), False),
        ("group_norm", lambda: nn.GroupNorm(2, 2), False),
        ("instance_norm", lambda: nn.InstanceNorm2d(2, affine=True, track_running_stats=True), False),
        ("batch_norm", lambda: nn.BatchNorm2d(2), False),
        ("mean over H W", lambda: Op(torch.mean, dim=(2, 3)), True),
        ("var over H", lambda: Op(torch.var, dim=2), True),
        ("softmax over H", lambda: Op(F.softmax, dim=2), False),
        ("adaptive avg to 1", lambda: nn.AdaptiveAvgPool2d(1), True),
        ("amax over H", lambda: Op(torch.amax, dim=2), True),
        ("pad reflect", lambda: Op(F.pad, pad=(1, 0, 2, 1), mode="reflect"), False),
        ("pad crop", lambda: Op(F.pad, pad=(0, 0, -1, 2), value=0.5), False),
        ("roll 3", lambda: Op(torch.roll, shifts=3, dims=2), False),
        ("flip H", lambda: Op(torch.flip, dims=(2,)), False),
    ]


def _run(rank, world_size, lengths):
    out = {}
    for n in lengths:
        # Two graphs per length: the slab outputs, and the replicated ones (their upstream
        # gradient is the same on every rank); each op reads its own input.
        for replicated_output in (False, True):
            names, cases = [], []
            for i, (name, factory, replicated) in enumerate(_cases()):
                if replicated != replicated_output:
                    continue
                torch.manual_seed(i)
                model = factory()
                names.append(name)
                cases.append((model, torch.randn(2, 2, n, 5), i))
            all_checks = check_many_against_one_device(
                cases,
                options={"compiler": sweep_compiler(world_size)},
                replicated_output=replicated_output,
                return_exceptions=True,
            )
            for name, checks in zip(names, all_checks):
                if isinstance(checks, Exception):  # reported per case
                    out[(n, name)] = [f"{type(checks).__name__}: {str(checks).splitlines()[0]}"]
                else:
                    out[(n, name)] = [k for k, (ok, _) in checks.items() if not ok]
    # The partition rule itself, through shard and gather.
    import fxhalo

    x = torch.arange(lengths[0] * 3.0).reshape(1, lengths[0], 3)
    local = fxhalo.domain.shard(x, 1)
    out["shard rows"] = local.shape[1]
    out["gather"] = bool(torch.equal(fxhalo.gather(local, 1), x))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size, lengths", [(3, (13,)), (4, (18,))], ids=["P3", "P4"])
def test_every_rule_is_exact_on_uneven_shards(world_size, lengths):
    per_rank = run_ranks(_run, world_size, lengths, timeout=560)
    for rank, res in enumerate(per_rank):
        failures = {k: v for k, v in res.items() if isinstance(v, list) and v}
        assert not failures, (rank, failures)
        base, extra = divmod(lengths[0], world_size)
        assert res["shard rows"] == base + (rank < extra)
        assert res["gather"]
