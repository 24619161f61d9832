"""shard / gather and group resolution on real ranks."""

import pytest
import torch

from tests.harness import run_ranks


def _roundtrip(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fxhalo

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4 * world_size, 5)
    out = {}
    y = fxhalo.domain.shard(x, shard_dim=2)
    out["shard"] = torch.equal(y, x[:, :, 4 * rank : 4 * (rank + 1)])
    out["roundtrip"] = torch.equal(fxhalo.gather(y, shard_dim=2), x)
    out["negative_dim"] = torch.equal(fxhalo.gather(fxhalo.domain.shard(x, shard_dim=-2), -2), x)

    # The gathered tensor is replicated: a loss taken on it on every rank gives each rank
    # exactly the one-device gradient of its own rows.
    w = torch.randn_like(x)
    y = y.clone().requires_grad_()
    (fxhalo.gather(y, 2) * w).sum().backward()
    out["gather_grad"] = torch.allclose(y.grad, fxhalo.domain.shard(w, 2))

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("domain",))
    d = fxhalo.Domain.from_group(mesh, shard_dim=2)
    out["mesh_1d"] = (d.rank, d.size) == (rank, world_size)
    if world_size == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "domain"))
        d2 = fxhalo.Domain.from_group((mesh2, "domain"))
        out["mesh_2d"] = (d2.rank, d2.size) == (rank % 2, 2)
        try:
            fxhalo.Domain.from_group(mesh2)
            out["mesh_2d_needs_axis"] = False
        except fxhalo.FxHaloError as e:
            out["mesh_2d_needs_axis"] = "domain axis" in str(e)
    out["world"] = fxhalo.Domain.from_group().group_name == dist.group.WORLD.group_name
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [3, 4])
def test_shard_gather_and_groups(world_size):
    for rank, out in enumerate(run_ranks(_roundtrip, world_size, timeout=180)):
        assert all(out.values()), (rank, out)
