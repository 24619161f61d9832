"""Beyond halos: an FNO at 256² and attention over 64² tokens, P ranks against one process.

::

    python -m benchmarks.beyond_halos [--world-size 2] [--compiler aot_eager] [--repeats 3]

Spawns the ranks.  Each compiles the model with ``backend="domain_parallel"`` on a
DomainTensor of the input (sharded along H) and times forward + backward steps;
rank 0 then runs the same model in one process (``torch.compile`` with the same inner
compiler, on the whole input) while the others wait.  Per model it prints the median
step time, the peak memory of one step per rank and its ratio to one process, and what
``fxhalo.explain`` counts per step: collectives and bytes, and for the moves of the
shard the analytic minimum (ratio 1.00: nothing beyond it).

Peak memory is the rise of the resident set over one step (Linux ``VmHWM``), measured
twice, in two spawns: ``RSS``, with glibc's allocator as it comes (it keeps freed blocks
in its heap, so the figure moves by tens of MiB between runs and between ranks), and
``live``, with every block of 128 KiB or more mapped on its own
(:func:`benchmarks.run.map_large_blocks`), where the rise is the peak of live tensor
bytes.  The step times come from the first spawn.  Where torch cannot compile the one-process
model (the FNO under Inductor, in torch 2.13), that row's one-process columns are
``nan`` and the error is printed under it.

Models (``benchmarks.models.FNO2d``, ``tests/beyond_models.py``): ``fno``, a lift (1x1 conv), 4 Fourier layers of width
32 keeping 16 x 16 modes, a projection, on ``[1, 3, 256, 256]``; ``attention``, one
8-head attention block of 256 channels over the 64 * 64 tokens of ``[1, 256, 64, 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import fxhalo
from benchmarks.run import _measure_memory, map_large_blocks
from fxhalo.launch import run_ranks


def _models():
    from benchmarks.models import FNO2d
    from tests.beyond_models import TokenAttention

    return {
        "fno": (FNO2d, (1, 3, 256, 256)),
        "attention": (lambda: TokenAttention(256, 8), (1, 256, 64, 64)),
    }


def _steps(fn, x, repeats: int) -> tuple[float, dict]:
    def step():
        y = fn(x)
        (y.to_local() if isinstance(y, fxhalo.DomainTensor) else y).square().mean().backward()

    step()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), _measure_memory(step)


def _one(rank, world_size, name: str, compiler: str, repeats: int, live: bool = False):
    if live and not map_large_blocks():
        raise RuntimeError("the live-bytes measure needs glibc's mallopt")
    make, shape = _models()[name]
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    opts = {"compiler": compiler}
    xs = fxhalo.shard(x, 2)
    slab = xs.to_local().requires_grad_()
    xd = fxhalo.from_local(slab, 2, lengths=xs.partition, run_check=False)
    compiled = torch.compile(model, backend="domain_parallel", options=opts)
    t_dist, mem_dist = _steps(compiled, xd, repeats)
    meta = torch.empty(shape, device="meta")
    ex = fxhalo.explain(model, meta, world_size=world_size, rank=rank, global_view=True)
    moves = [r for r in ex.rows if r.minimum is not None]
    out = {
        "time": t_dist,
        "step_bytes": mem_dist["step_bytes"],
        "collectives": len(ex.forward()) + len(ex.backward()),
        "bytes": sum(c.bytes for c in ex.forward()) + sum(c.bytes for c in ex.backward()),
        "moves": len(moves),
        "move_bytes": sum(r.bytes_sent for r in moves),
        "move_minimum": sum(r.minimum for r in moves),
    }
    dist.barrier()
    if rank == 0:
        torch._dynamo.reset()
        backend = "aot_eager" if compiler == "aot_eager" else "inductor"
        one = torch.compile(make(), backend=backend)
        try:
            t_one, mem_one = _steps(one, x.clone().requires_grad_(), repeats)
            out["one_time"], out["one_step_bytes"] = t_one, mem_one["step_bytes"]
        except Exception as e:  # torch's own compile of the one-process model can fail (FNO under Inductor)
            out["one_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            out["one_time"] = out["one_step_bytes"] = float("nan")
    dist.barrier()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--compiler", default="aot_eager")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="fno,attention")
    args = parser.parse_args(argv)
    print(f"{args.world_size} ranks (gloo, CPU), inner compiler {args.compiler}, median of {args.repeats} steps")
    head = (
        f"{'model':10} {'ms/step P':>10} {'ms/step 1':>10} {'RSS MiB/rank':>13} {'RSS MiB 1':>10} {'ratio':>6} "
        f"{'live MiB/rank':>13} {'live MiB 1':>10} {'ratio':>6} {'colls/step':>10} {'KiB/step':>9} "
        f"{'moves':>6} {'move/min':>9}"
    )
    print(head)
    for name in args.models.split(","):
        per_rank = run_ranks(_one, args.world_size, name, args.compiler, args.repeats, timeout=3000)
        live = run_ranks(_one, args.world_size, name, args.compiler, 1, True, timeout=3000)
        r0 = per_rank[0]
        move = r0["move_bytes"] / r0["move_minimum"] if r0["move_minimum"] else float("nan")
        memory = ""
        for runs in (per_rank, live):
            peak, one = max(r["step_bytes"] for r in runs), runs[0]["one_step_bytes"]
            memory += f" {peak / 2**20:13.1f} {one / 2**20:10.1f} {peak / one:6.2f}"
        print(
            f"{name:10} {1e3 * max(r['time'] for r in per_rank):10.1f} {1e3 * r0['one_time']:10.1f}{memory} "
            f"{r0['collectives']:10d} {r0['bytes'] / 1024:9.1f} {r0['moves']:6d} {move:9.2f}"
        )
        if "one_error" in r0:
            print(f"{'':10} one process failed to compile with {args.compiler}: {r0['one_error']}")


if __name__ == "__main__":
    main()
