"""The exchange with corners on a 2-D mesh: one collective over the whole domain against one per axis.

::

    python -m benchmarks.corner_exchange [--mesh 2x2] [--halo 1] [--channels 8] [--repeats 200]

Issue 17 names two ways to give every rank of a ``p x q`` mesh the halo of its block,
corners included:

- **one collective** (what fxhalo does, :mod:`fxhalo.block_halo`): every rank sends each
  of its up to 8 neighbours the edge or corner piece it needs, in one
  ``all_to_all_single`` over the whole domain (``p * q`` ranks), and puts the extended
  block together from the pieces;
- **per axis** (written here for the measurement): one
  :func:`fxhalo.halo.halo_exchange` along H, then one along W on the H-extended block,
  the fill rows past the global edges left home; two ``all_to_all_single`` calls, each
  over one axis's group of ``p`` (or ``q``) ranks.

Both move exactly the same values (the script checks that the extended blocks are equal
and that each rank sends as many elements either way), so the choice is latency: one
collective over the whole domain, whose all_to_all also posts a (zero-size) message to
every rank that is not a neighbour, against two over small groups.  Prints, per block
size, the median time of one exchange (forward only, ``--repeats`` times, interleaved) on
the slowest rank.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from fxhalo.block_halo import exchange_on_axes
from fxhalo.domain import Domain, ShardAxis
from fxhalo.halo import Fill, HaloPlan, assemble, needs_from_widths, plan_halo, send_buffer
from fxhalo.launch import run_ranks
from fxhalo.mesh import mesh_domain


def _plans(x, r: int, mesh):
    """Each axis's 1-D plan (dim, HaloPlan, group name) for a halo of ``r`` on equal blocks."""
    out = []
    for dim, axis in ((2, "h"), (3, "w")):
        domain = Domain.from_group(mesh, shard_dim=dim, mesh_axis=axis)
        n = x.shape[dim]  # equal blocks: rank q holds [q n, (q + 1) n)
        part = tuple((q * n, (q + 1) * n) for q in range(domain.size))
        out.append(
            (dim, plan_halo(part, needs_from_widths(part, ((r, r),) * domain.size), domain.rank), domain.group_name)
        )
    return out


def _fills_of(plan: HaloPlan, dim: int) -> list[Fill]:
    """The fill rows ``plan`` puts at the ends of ``dim``, which the next axis's exchange leaves home."""
    lo = sum(p.length for p in plan.pieces[: next(i for i, p in enumerate(plan.pieces) if p.kind != "fill")])
    hi = sum(
        p.length
        for p in plan.pieces[
            len(plan.pieces) - next(i for i, p in enumerate(reversed(plan.pieces)) if p.kind != "fill") :
        ]
    )
    return [Fill(dim, lo, 0.0, hi, 0.0)] if lo or hi else []


def per_axis(x, r: int, mesh):
    """One exchange per axis, the second on the block the first extended, its fill rows left home (zero
    padding).  Returns the extended block and the elements this rank sent."""
    fills, sent = [], 0
    for dim, plan, group in _plans(x, r, mesh):
        core = x
        for fill in fills:
            core = fill.strip(core)
        recv = None
        if plan.collective:
            buffer = send_buffer(core, dim, plan)
            sent += buffer.numel()
            recv = torch.ops._c10d_functional.all_to_all_single(
                buffer, list(plan.recv_splits), list(plan.send_splits), group
            )
            recv = torch.ops._c10d_functional.wait_tensor(recv).movedim(0, dim)
            for fill in fills:
                recv = fill.restore(recv)
        x = assemble(x, recv, dim, plan)
        fills += _fills_of(plan, dim)
    return x, sent


def one_collective(x, r: int, mesh):
    """fxhalo's: the block's halo in one all_to_all over the whole domain.  Returns the extended block and
    the elements this rank sent."""
    axes = tuple(ShardAxis(dim, group, None) for dim, _, group in _plans(x, r, mesh))
    exchanges = {a: (dim, plan, None) for a, (dim, plan, _) in enumerate(_plans(x, r, mesh))}
    sent = []
    real = torch.ops._c10d_functional.all_to_all_single

    def counted(buffer, *args):
        sent.append(buffer.numel())
        return real(buffer, *args)

    torch.ops._c10d_functional.all_to_all_single = counted
    try:
        out = exchange_on_axes(x, axes, exchanges)
    finally:
        torch.ops._c10d_functional.all_to_all_single = real
    return out, sum(sent)


def _rank(rank, world_size, shape, sizes, r, channels, repeats):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("h", "w"))
    mesh_domain(mesh, (2, 3))  # the whole domain's group, as the backend makes it
    out = {}
    for n in sizes:
        torch.manual_seed(rank)
        x = torch.randn(1, channels, n, n)
        (a, sent_a), (b, sent_b) = per_axis(x, r, mesh), one_collective(x, r, mesh)
        if not torch.equal(a, b) or sent_a != sent_b:
            raise AssertionError(f"the two exchanges disagree on rank {rank} for {n} x {n} blocks")
        times = {"per axis": [], "one collective": []}
        exchanges = (
            ("per axis", lambda x=x: per_axis(x, r, mesh)),
            ("one collective", lambda x=x: one_collective(x, r, mesh)),
        )
        for _ in range(repeats):
            for name, fn in exchanges:
                dist.barrier()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        out[n] = {name: statistics.median(t) for name, t in times.items()}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2x2")
    parser.add_argument("--halo", type=int, default=1)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--sizes", default="16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.mesh.split("x"))
    sizes = [int(v) for v in args.sizes.split(",")]
    per_rank = run_ranks(_rank, shape[0] * shape[1], shape, sizes, args.halo, args.channels, args.repeats, timeout=3600)
    print(
        f"{args.mesh} mesh (gloo, CPU), halo {args.halo}, {args.channels} channels fp32, "
        f"median of {args.repeats} exchanges, slowest rank"
    )
    print("block | per axis (2 collectives) us | one collective us | one / per axis")
    for n in sizes:
        a = max(r[n]["per axis"] for r in per_rank)
        b = max(r[n]["one collective"] for r in per_rank)
        print(f"{n} x {n} | {1e6 * a:.0f} | {1e6 * b:.0f} | {b / a:.2f}")


if __name__ == "__main__":
    main()
