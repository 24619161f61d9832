"""When does the early rank of an exchange get its data? ``python -m benchmarks.late_rank``.

Two gloo ranks, one thread each, repeat: compute (rank 0 ``--late`` ms longer than rank 1), one
``all_to_all_single`` of ``--kib`` KiB and its wait, then ``--after`` ms of work on rank 0 and,
on rank 1, the same work (``--early-after compute``) or a sleep (``--early-after sleep``).  On the
common monotonic clock it prints when each rank left the wait: rank 1 (early) should leave when
rank 0's data arrives, just after rank 0 enters.  Used in docs/performance.md to tell gloo's
delays from the ranks' own work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

__all__ = ["main"]


def _rank(rank: int, world_size: int, late_ms: float, after_ms: float, early_sleeps: bool, kib: int, steps: int):
    import torch.distributed as dist

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(kib * 256)  # 4 bytes a value
    half = x.numel() // 2
    name = dist.group.WORLD.group_name

    def work(ms: float) -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < ms / 1e3:
            a @ b

    times = []
    for _ in range(steps):
        work(0.5 + (late_ms if rank == 0 else 0.0))
        entered = time.monotonic_ns()
        y = torch.ops._c10d_functional.all_to_all_single(x, [half, half], [half, half], name)
        torch.ops._c10d_functional.wait_tensor(y)
        times.append((entered, time.monotonic_ns()))
        if rank == 1 and early_sleeps:
            time.sleep(after_ms / 1e3)
        else:
            work(after_ms)
    return times[10:]


def main(argv=None) -> None:
    from fxhalo.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--late", type=float, default=1.3, help="ms rank 0 arrives after rank 1")
    parser.add_argument("--after", type=float, default=1.0, help="ms of work after the exchange")
    parser.add_argument("--early-after", choices=("compute", "sleep"), default="compute")
    parser.add_argument("--kib", type=int, default=16)
    parser.add_argument("--steps", type=int, default=110)
    args = parser.parse_args(argv)
    late, early = run_ranks(_rank, 2, args.late, args.after, args.early_after == "sleep", args.kib, args.steps)
    arrival = [(i0 - i1) / 1e6 for (i0, _), (i1, _) in zip(late, early)]
    leave = [(o0 - o1) / 1e6 for (_, o0), (_, o1) in zip(late, early)]
    tenth = statistics.quantiles(leave, n=10)
    print(f"{len(leave)} exchanges of {args.kib} KiB; rank 1 after the exchange: {args.early_after}")
    print(f"rank 0 entered after rank 1 by {statistics.median(arrival):.2f} ms (median)")
    print(
        f"rank 0 left the wait after rank 1 by: median {statistics.median(leave):.2f} ms, "
        f"slowest tenth from {tenth[-1]:.2f} ms, max {max(leave):.2f} ms"
    )


if __name__ == "__main__":
    main()
