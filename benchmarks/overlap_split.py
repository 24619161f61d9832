"""Does splitting a conv around its halo exchange pay? ``python -m benchmarks.overlap_split``.

Issue 18, item 1, asks for the split and for the size where it starts to pay. This script measures
both forms of one halo conv on 2 gloo ranks, one thread each, eager:

* **whole** (what fxhalo runs): exchange, wait, ``cat`` of the received rows and the shard, one conv;
* **split**: start the exchange, convolve the rows that need no halo, wait, convolve the two edge
  strips, ``cat`` the three outputs.

Each rank exchanges one row with each ring neighbour. The kernel is 3×3 (3×3×3), padded by 1 along the
other dims. Everything is channels-last, as Inductor runs convolutions on CPU and as fxhalo's
``cat_layout`` pass lays out the halo's ``cat``. Before each call a rank works 1 ms (matmul, standing
for the other layers), meets the other at a barrier, then works a random 0 to ``--jitter`` ms of its
own, so that the ranks arrive apart as they do in a step (the split may fill that wait with its
interior). The timer starts after the jitter. With ``--backward`` each call also runs the backward
(input and weight gradients; the exchange's gradient goes back by the collective's autograd). It prints
the median ms per call for each local shard shape, per rank. Inductor runs the same oneDNN convolutions,
and the exchange is the same collective. Timing is not a test; docs/performance.md quotes this script
with its command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed._functional_collectives  # noqa: F401  (registers the collective's autograd)
import torch.nn.functional as F

__all__ = ["SHAPES", "main"]

#: local shard shapes (N, C, rows, ...): SmallUNet's levels at 256² and 512² on 2 ranks, wider channels,
#: and the conv3d benchmark's 64³ shard with batch 2 and 1
SHAPES = (
    (2, 8, 64, 128),
    (2, 8, 128, 256),
    (2, 8, 256, 512),
    (2, 16, 128, 256),
    (2, 32, 64, 128),
    (2, 64, 32, 64),
    (2, 8, 32, 64, 64),
    (1, 16, 32, 64, 64),
)


def _rank(rank: int, world_size: int, shapes, repeats: int, jitter_ms: float, backward: bool):
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = dist.group.WORLD.group_name
    up, down = (rank - 1) % world_size, (rank + 1) % world_size
    splits = [0] * world_size
    splits[up] += 1
    splits[down] += 1
    filler = torch.randn(160, 160)
    jitter = torch.Generator().manual_seed(1000 + rank)

    def work(ms: float) -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < ms / 1e3:
            filler @ filler

    medians = {}
    for shape in shapes:
        nd = len(shape) - 2
        conv = {2: F.conv2d, 3: F.conv3d}[nd]
        layout = torch.channels_last if nd == 2 else torch.channels_last_3d
        torch.manual_seed(rank)
        x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(backward)
        w = torch.randn(shape[1], shape[1], *[3] * nd).contiguous(memory_format=layout).requires_grad_(backward)
        padding = (0,) + (1,) * (nd - 1)

        def start(x=x):
            rows = torch.cat([x[:, :, :1], x[:, :, -1:]], 2).movedim(2, 0).contiguous()
            return torch.ops._c10d_functional.all_to_all_single(rows, splits, splits, group)

        def received(pending, layout=layout):
            rows = torch.ops._c10d_functional.wait_tensor(pending).movedim(0, 2).contiguous(memory_format=layout)
            return rows[:, :, :1], rows[:, :, 1:]  # the row above (up's last), the row below (down's first)

        def whole(x=x, w=w, conv=conv, padding=padding):
            above, below = received(start())
            return conv(torch.cat([above, x, below], 2), w, None, 1, padding)

        def split(x=x, w=w, conv=conv, padding=padding):
            pending = start()
            interior = conv(x, w, None, 1, padding)
            above, below = received(pending)
            first = conv(torch.cat([above, x[:, :, :2]], 2), w, None, 1, padding)
            last = conv(torch.cat([x[:, :, -2:], below], 2), w, None, 1, padding)
            return torch.cat([first, interior, last], 2)

        if not torch.allclose(whole(), split(), atol=1e-4):
            raise AssertionError(f"the two forms differ for {shape}")
        upstream = torch.randn(whole().shape).contiguous(memory_format=layout)

        def timed(fn, upstream=upstream):
            y = fn()
            if backward:
                y.backward(upstream)
            return y

        times = {"whole": [], "split": []}
        for i in range(repeats):
            order = (("whole", whole), ("split", split)) if i % 2 else (("split", split), ("whole", whole))
            for name, fn in order:
                work(1.0)
                dist.barrier()
                work(jitter_ms * float(torch.rand((), generator=jitter)))  # the ranks arrive apart
                t = time.perf_counter()
                timed(fn)
                times[name].append(time.perf_counter() - t)
        medians[shape] = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    return medians


def main(argv=None) -> None:
    from fxhalo.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=60, help="calls of each form per shape")
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="each rank first works a random 0..JITTER ms: the ranks arrive apart"
    )
    parser.add_argument("--backward", action="store_true", help="time forward and backward")
    parser.add_argument("--quick", action="store_true", help="two small shapes (the smoke test)")
    parser.add_argument(
        "--shape", action="append", default=[], help="a local shard shape, e.g. 2,8,512,1024 (repeatable)"
    )
    args = parser.parse_args(argv)
    shapes = ((2, 4, 16, 16), (1, 4, 8, 8, 8)) if args.quick else SHAPES
    if args.shape:
        shapes = tuple(tuple(int(n) for n in s.split(",")) for s in args.shape)
    per_rank = run_ranks(_rank, 2, shapes, args.repeats, args.jitter, args.backward, timeout=900)
    print("| local shard (N, C, rows, ...) | whole ms, rank 0 / 1 | split ms, rank 0 / 1 | split / whole |")
    print("|---|---|---|---|")
    for shape in shapes:
        a, b = per_rank[0][shape], per_rank[1][shape]
        ratio = (a["split"] + b["split"]) / (a["whole"] + b["whole"])
        print(f"| {shape} | {a['whole']:.2f} / {b['whole']:.2f} | {a['split']:.2f} / {b['split']:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
