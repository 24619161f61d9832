"""The weather-model periodic conv: circular pad on W (longitude), reflect pad on H (poles), unpadded conv.

The W pad is local; the H pad is folded into the conv's halo, so reflection happens
at the global poles only (the system we replace zero-pads them).  The pole rows,
rank 0's first output row and the last rank's last, are checked on their own.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.harness import check_against_one_device, close, run_ranks


class PeriodicConv2d(nn.Module):
    def __init__(self, cin=2, cout=3, k=3):
        super().__init__()
        self.p = k // 2
        self.conv = nn.Conv2d(cin, cout, k, padding=0)

    def forward(self, x):
        x = F.pad(x, (self.p, self.p, 0, 0), mode="circular")  # longitude wraps
        x = F.pad(x, (0, 0, self.p, self.p), mode="reflect")  # latitude reflects at the poles
        return self.conv(x)


def _run(rank, world_size):
    import fxhalo

    out = {}
    for k in (3, 5):
        torch.manual_seed(k)
        m = PeriodicConv2d(k=k)
        x = torch.randn(2, 2, 4 * world_size, 8)
        checks = check_against_one_device(m, x, options={"compiler": "aot_eager"})
        y = torch.compile(m, backend="domain_parallel", options={"compiler": "aot_eager"})(fxhalo.domain.shard(x, 2))
        want = m(x).detach()
        if rank == 0:
            checks["north pole row"] = close(y[:, :, 0], want[:, :, 0])
        if rank == world_size - 1:
            checks["south pole row"] = close(y[:, :, -1], want[:, :, -1])
        out[k] = {name: ok for name, (ok, _) in checks.items()}
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_periodic_conv_is_exact_including_the_poles(world_size):
    for rank, per_k in enumerate(run_ranks(_run, world_size, timeout=240)):
        for k, checks in per_k.items():
            assert all(checks.values()), (rank, k, checks)
            if rank in (0, world_size - 1):
                assert any("pole" in name for name in checks)
