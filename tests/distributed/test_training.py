"""Training end to end: sharded training gives the model that one device gives.

The protocol (docs/training.md): 10 SGD steps (lr 1e-3), each on fresh random
inputs with fresh random output gradients, once sharded and once on one device;
then the mean squared difference of every parameter must be <= 1e-6, absolute and
relative to the parameter's mean square.

One spawned group per world size runs, on ``fxhalo.models.SmallUNet`` (convs,
GroupNorm, a kernel-3 / stride-2 downsample, a ×2 upsample, a 1×1 head):

- even shards with the skip concatenation, and uneven shards (``H`` not divisible
  by the rank count, 37 rows on 4 ranks) without it (see SmallUNet for why);
- the replicas stay bit-identical across ranks (``grad_sync`` gives every rank
  the same summed gradient) and the gradient reductions come as one bucket;
- ``model.compile(...)`` keeps the state-dict keys; a checkpoint written by the
  sharded run loads into a plain model that reproduces the gathered output;
- a bf16 autocast forward, within bf16 tolerance of one device under autocast.

A 2 data × 2 domain mesh trained with DDP over the data axis is checked against
one device on the concatenated batch.
"""

import pytest
import torch

from tests.harness import run_ranks, sweep_compiler

STEPS, LR = 10, 1e-3


def _params_mse(model, ref):
    """Per parameter: (mean squared difference, that relative to the reference's mean square)."""
    out = {}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        mse = (p.detach().double() - q.detach().double()).pow(2).mean().item()
        out[name] = (mse, mse / max(q.detach().double().pow(2).mean().item(), 1e-30))
    return out


def _identical_across_ranks(model) -> bool:
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    seen = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, flat)
    return all(torch.equal(s, flat) for s in seen)


def _train(world_size, height, skip, seed):
    """10 SGD steps sharded and on one device; returns the parameter MSEs and side checks."""
    import fxhalo
    from fxhalo.models import SmallUNet

    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = SmallUNet(width=8, groups=4, skip=skip)
    ref = SmallUNet(width=8, groups=4, skip=skip)
    ref.load_state_dict(model.state_dict())
    keys = list(model.state_dict())

    graphs = []

    def capture(gm, example_inputs):  # the sweep's compiler, keeping the rewritten graph to count buckets
        from fxhalo.backend import _inner

        graphs.append(gm)
        return _inner(sweep_compiler(world_size))(gm, example_inputs)

    model.compile(backend="domain_parallel", options={"compiler": capture})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for _step in range(STEPS):
        x = torch.randn(2, 1, height, 8)
        y_ref = ref(x)
        grad_out = torch.randn_like(y_ref)
        y_ref.backward(grad_out)
        ref_opt.step()
        ref_opt.zero_grad()

        y = model(fxhalo.domain.shard(x, 2))
        y.backward(fxhalo.domain.shard(grad_out, 2))
        opt.step()
        opt.zero_grad()

    synced = [n for gm in graphs for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "synced_params"]
    x = torch.randn(2, 1, height, 8)
    with torch.no_grad():
        gathered = fxhalo.gather(model(fxhalo.domain.shard(x, 2)), 2)
        plain = SmallUNet(width=8, groups=4, skip=skip)
        plain.load_state_dict(model.state_dict())  # the sharded run's checkpoint, into a plain model
        reloaded = (plain(x) - gathered).abs().max().item()
    return {
        "mse": _params_mse(model, ref),
        "identical": _identical_across_ranks(model),
        "buckets": [len(n.args) for n in synced],
        "n_params": len(list(model.parameters())),
        "keys": list(model.state_dict()) == keys,
        "reloaded_err": reloaded,
    }


def _autocast(world_size):
    import fxhalo
    from fxhalo.models import SmallUNet

    torch._dynamo.reset()
    torch.manual_seed(5)
    model = SmallUNet(width=8, groups=4)
    x = torch.randn(2, 1, 8 * world_size, 8)
    compiled = torch.compile(model, backend="domain_parallel", options={"compiler": sweep_compiler(world_size)})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        got = compiled(fxhalo.domain.shard(x, 2))
    want = fxhalo.domain.shard(want, 2)
    return {
        "dtype": str(got.dtype),
        "want_dtype": str(want.dtype),
        "err": (got.float() - want.float()).abs().max().item(),
        "scale": want.float().abs().max().item(),
    }


def _run(rank, world_size, uneven_height):
    return {
        "even": _train(world_size, 8 * world_size, True, seed=1),
        "uneven": _train(world_size, uneven_height, False, seed=2),
        "autocast": _autocast(world_size),
    }


@pytest.fixture(scope="module", params=[(2, 15), (4, 37)], ids=lambda p: f"P{p[0]}")
def ranks(request):
    world_size, uneven = request.param
    return world_size, run_ranks(_run, world_size, uneven, timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("case", ["even", "uneven"])
def test_ten_sgd_steps_match_one_device(ranks, case):
    _, per_rank = ranks
    for rank, res in enumerate(per_rank):
        worst = {name: v for name, v in res[case]["mse"].items() if v[0] > 1e-6 or v[1] > 1e-6}
        assert not worst, (rank, worst)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("case", ["even", "uneven"])
def test_replicas_stay_identical_and_gradients_come_in_one_bucket(ranks, case):
    _, per_rank = ranks
    for res in per_rank:
        r = res[case]
        assert r["identical"]
        assert r["buckets"] == [r["n_params"]]  # every parameter, one all_reduce per backward


@pytest.mark.timeout(450)
@pytest.mark.parametrize("case", ["even", "uneven"])
def test_state_dict_keys_and_checkpoints_move_between_sharded_and_plain(ranks, case):
    _, per_rank = ranks
    for res in per_rank:
        assert res[case]["keys"]
        assert res[case]["reloaded_err"] < 1e-5


@pytest.mark.timeout(450)
def test_bf16_autocast_forward_within_bf16_tolerance(ranks):
    _, per_rank = ranks
    for res in per_rank:
        a = res["autocast"]
        assert a["dtype"] == a["want_dtype"] == "torch.bfloat16"
        assert a["err"] <= 2e-2 * max(1.0, a["scale"]), a


# -- data x domain ------------------------------------------------------------------


def _ddp(rank, world_size, domain_axes, global_view=False):
    """2 data x 2 domain ranks: DDP over the data axis, fxhalo over the domain axis; with ``("h", "w")``, a
    data x H x W mesh of 2 x 2 x 1 whose domain shards dims 2 and 3 (fxhalo.mesh); with ``global_view``,
    the blocks passed as DomainTensors (``fxhalo.from_local(..., group=(mesh, ("h", "w")))``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fxhalo
    from fxhalo.mesh import mesh_domain
    from fxhalo.models import SmallUNet
    from tests.harness import mesh_block

    shape = (2,) + (2, 1)[: len(domain_axes)]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data", *domain_axes))
    data_rank = mesh.get_local_rank("data")
    shard_dims = (2, 3)[: len(domain_axes)]
    domain = mesh_domain((mesh, domain_axes), shard_dims)
    torch.manual_seed(0)
    model = SmallUNet(width=8, groups=4)
    ref = SmallUNet(width=8, groups=4)
    ref.load_state_dict(model.state_dict())
    if len(domain_axes) == 1:  # the 1-D spelling
        options = {"group": (mesh, domain_axes[0]), "compiler": "aot_eager"}
    else:
        options = {"group": (mesh, domain_axes), "shard_dim": shard_dims, "compiler": "aot_eager"}
    if global_view:  # the DomainTensors carry the mesh
        options = {"compiler": "aot_eager"}
    compiled = torch.compile(model, backend="domain_parallel", options=options)
    ddp = DDP(compiled, process_group=mesh.get_group("data"))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for _step in range(3):
        x = torch.randn(4, 1, 16, 8)  # the global batch: data rank d takes samples 2d, 2d+1
        # The loss is a mean over the global batch: each data replica's output gradient is
        # that of its half of the batch, and DDP averages the replicas' gradients.
        grad_out = torch.randn(4, 1, 16, 8) / 4
        y_ref = ref(x)
        y_ref.backward(grad_out)
        ref_opt.step()
        ref_opt.zero_grad()

        mine = slice(2 * data_rank, 2 * data_rank + 2)
        block = mesh_block(x[mine], domain, shard_dims)
        if global_view:
            block = fxhalo.from_local(block, shard_dims, (mesh, domain_axes))
        y = ddp(block)
        y = y.to_local() if global_view else y
        y.backward(mesh_block(grad_out[mine], domain, shard_dims) * 2)  # DDP divides by 2 replicas
        opt.step()
        opt.zero_grad()
    mse = _params_mse(model, ref)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    seen = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(seen, flat)
    return {"mse": mse, "identical": all(torch.equal(s, flat) for s in seen)}


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "domain_axes, global_view",
    [(("domain",), False), (("h", "w"), False), (("h", "w"), True)],
    ids=["data_x_domain", "data_x_h_x_w", "data_x_h_x_w_domain_tensors"],
)
def test_data_times_domain_mesh_with_ddp_matches_one_device_on_the_whole_batch(domain_axes, global_view):
    for rank, res in enumerate(run_ranks(_ddp, 4, domain_axes, global_view, timeout=360)):
        worst = {name: v for name, v in res["mse"].items() if v[0] > 1e-6 or v[1] > 1e-6}
        assert not worst, (rank, worst)
        assert res["identical"], rank
