"""Compile time of the global view against the plain path, on the same model and input.

::

    python -m benchmarks.compile_time [--world-size 2] [--compiler aot_eager] [--rows 64]

Spawns the ranks (fresh ones per path), compiles ``fxhalo.models.SmallUNet`` with
``backend="domain_parallel"`` once on plain local slabs (``fxhalo.domain.shard``) and once
on DomainTensors (``fxhalo.shard``), and prints per path the
first call (Dynamo's trace, fxhalo's passes, the inner compile, one run) and the mean of
five later calls, the slowest rank's, with Inductor's caches off (both paths compile
the same local program, so the second would hit them).  The rows must suit both paths:
an even local height on every rank.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxhalo
from fxhalo.launch import run_ranks


def _one(rank, world_size, path: str, compiler: str, rows: int):
    from fxhalo.models import SmallUNet

    # Both paths compile the same local program: without this the second would hit Inductor's caches.
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    model, x = SmallUNet(), torch.randn(2, 1, rows, 64)
    torch._dynamo.reset()
    inputs = fxhalo.shard(x, 2) if path == "global" else fxhalo.domain.shard(x, 2)
    compiled = torch.compile(model, backend="domain_parallel", options={"compiler": compiler})
    start = time.perf_counter()
    compiled(inputs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        compiled(inputs)
    return first, (time.perf_counter() - start) / 5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--compiler", default="aot_eager")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    # Each path in fresh processes: the first compile in a process also pays one-time set-up costs.
    results = {
        path: run_ranks(_one, args.world_size, path, args.compiler, args.rows, timeout=1800)
        for path in ("plain", "global")
    }
    print(f"SmallUNet, input (2, 1, {args.rows}, 64), {args.world_size} ranks, inner compiler {args.compiler}")
    print(f"{'path':8}  {'first call (s)':>14}  {'later calls (ms)':>16}")
    for path, per_rank in results.items():
        first = max(first for first, _ in per_rank)
        later = max(later for _, later in per_rank)
        print(f"{path:8}  {first:14.2f}  {1e3 * later:16.1f}")


if __name__ == "__main__":
    main()
