"""Where a rank's training step goes: ``python -m benchmarks.profile_step``.

Runs fxhalo's compiled row of a benchmark model (:mod:`benchmarks.models`) on P gloo ranks,
one thread each, and prints per rank

* the step's wall time and the main thread's CPU time (profiler off, median of ``--repeats``),
* the most expensive ops and Inductor kernels (``torch.profiler`` over ``--profiled`` steps, with
  Inductor's per-kernel records on), per step,
* per collective of one step, when each rank *entered* gloo's collective and how long after
  the later of the two entries each rank *finished* it ("after both"), from the two ranks'
  traces on the common clock.  A collective whose data had only to be copied takes about
  0.15 ms there; more is time spent before the receiving rank's threads ran.

Timing is not a test; the figures in docs/performance.md come from this script with the command
they name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.models import MODELS, Config
from benchmarks.run import _domain_tensor, _local_rows

__all__ = ["main"]


def _rank(rank: int, world_size: int, cfg: Config, repeats: int, profiled: int, trace_dir: str, compiler: str) -> dict:
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    import fxhalo

    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True  # one profiler record per generated kernel
    bench = MODELS[cfg.model]
    torch.manual_seed(0)
    model = bench.build(cfg)
    x_full = torch.randn(bench.input_shape(cfg))
    n = x_full.shape[bench.shard_dim]
    x = _local_rows(x_full, bench.shard_dim, rank, world_size)
    if bench.global_view:  # as the runner's fxhalo row does
        x = _domain_tensor(x, bench.shard_dim, n, world_size)
    compiled = torch.compile(
        model, backend="domain_parallel", options={"shard_dim": bench.shard_dim, "compiler": compiler}
    )

    def step():
        for p in model.parameters():
            p.grad = None
        y = compiled(x)
        y = y.to_local() if isinstance(y, fxhalo.DomainTensor) else y
        (y.square().sum() / 1e5).backward()

    for _ in range(3):
        step()
    torch.distributed.barrier()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            step()
    trace = Path(trace_dir) / f"rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    top = [
        (e.key, e.self_cpu_time_total / 1e3 / profiled, e.count // profiled)
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return {"wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus), "top": top}


def _collectives(trace_dir: str, world_size: int, profiled: int) -> list[list[tuple[float, float]]]:
    """Per collective of the last profiled step: per rank (entry ms, finish ms after the last entry)."""
    per_rank = []
    for r in range(world_size):
        events = json.loads((Path(trace_dir) / f"rank{r}.json").read_text())["traceEvents"]
        per_rank.append(sorted((e for e in events if e.get("name", "").startswith("gloo:")), key=lambda e: e["ts"]))
    n = min(len(g) for g in per_rank) // profiled
    if not n:  # one rank (plain Inductor, the reference's kernels): no collectives
        return []
    start = per_rank[0][(profiled - 1) * n]["ts"]
    rows = []
    for k in range((profiled - 1) * n, profiled * n):
        last_entry = max(g[k]["ts"] for g in per_rank)
        rows.append(
            [
                ((g[k]["ts"] - start) / 1e3, (g[k]["ts"] + g[k]["dur"] - last_entry) / 1e3, g[k]["name"])
                for g in per_rank
            ]
        )
    return rows


def main(argv=None) -> None:
    from fxhalo.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet2d", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"))
    args = parser.parse_args(argv)
    bench = MODELS[args.model]
    cfg = bench.config(size=args.size)
    with tempfile.TemporaryDirectory() as trace_dir:
        out = run_ranks(_rank, args.ranks, cfg, args.repeats, args.profiled, trace_dir, args.compiler)
        rows = _collectives(trace_dir, args.ranks, args.profiled)
    print(f"{args.model} {cfg}, {args.ranks} ranks, 1 thread each")
    for r, o in enumerate(out):
        print(f"\nrank {r}: step {o['wall_ms']:.1f} ms wall, {o['cpu_ms']:.1f} ms main-thread CPU (median)")
        for name, ms, calls in o["top"]:
            print(f"  {ms:7.2f} ms/step  {calls:3d} calls  {name[:110]}")
    print("\ncollective  " + "  ".join(f"rank {r}: entry ms, after both ms" for r in range(args.ranks)))
    for k, row in enumerate(rows):
        print(f"{k:10d}  " + "  ".join(f"{entry:8.2f} {after:6.2f}" + " " * 14 for entry, after, _ in row))


if __name__ == "__main__":
    main()
