"""A small domain-parallel run you can watch: ``python -m fxhalo.demo``.

It spawns ``--ranks`` gloo processes on this machine (or, under
``torchrun --nproc-per-node N -m fxhalo.demo``, joins torchrun's group),
compiles a small convolutional net with ``backend="domain_parallel"``, runs
forward and backward on each rank's slab of a smooth 2-D field, and compares
the gathered result and the weight gradients with one device running the same
net on the whole field.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from .domain import gather, shard
from .launch import run_ranks


class DemoNet(nn.Module):
    """Convolutions that cross shard edges in every way the backend handles today."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, padding_mode="reflect"),  # reflected poles
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),  # kernel 3 / stride 2 downsample
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2, padding_mode="circular"),  # dilated ring
            nn.ReLU(),
            nn.Conv2d(channels, channels, 4, padding="same"),  # even kernel, asymmetric halo
            nn.Tanh(),
            nn.Conv2d(channels, 1, 1),  # 1x1: proven local, left alone
        )

    def forward(self, x):
        return self.net(x)


def smooth_field(batch: int, size: int) -> torch.Tensor:
    """A few Fourier modes: a stand-in for a physical field such as temperature."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 2 * math.pi, size), torch.linspace(0, 2 * math.pi, size), indexing="ij")
    field = torch.zeros(batch, 1, size, size)
    for _ in range(6):
        kx, ky = torch.randint(1, 5, (2,), generator=g).tolist()
        phase = torch.rand(batch, 1, 1, 1, generator=g) * 2 * math.pi
        field += torch.sin(kx * x + ky * y + phase) / (kx + ky)
    return field


def run(rank: int, world_size: int, size: int, compiler: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = DemoNet()
    x = smooth_field(2, size)

    # One device, whole field.
    ref = model(x)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Every rank, its slab.
    compiled = torch.compile(model, backend="domain_parallel", options={"compiler": compiler})
    x_local = shard(x, shard_dim=2)
    t0 = time.perf_counter()
    y_local = compiled(x_local)
    y = gather(y_local, shard_dim=2)
    y.square().mean().backward()
    first = time.perf_counter() - t0
    grad_err = 0.0
    for n, p in model.named_parameters():
        summed = p.grad.clone()
        dist.all_reduce(summed)  # each rank holds a partial weight gradient
        grad_err = max(grad_err, (summed - ref_grads[n]).abs().max().item())

    times = []
    for _ in range(steps):
        model.zero_grad()
        t0 = time.perf_counter()
        compiled(x_local).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return {
        "rank": rank,
        "local shape": tuple(x_local.shape),
        "forward max |err|": (y - ref).abs().max().item(),
        "weight-grad max |err|": grad_err,
        "compile + first step [s]": f"{first:.2f}",
        "median step [ms]": f"{1000 * sorted(times)[len(times) // 2]:.1f}" if times else "-",
    }


def _worst(rows: list[dict]) -> float:
    return max(max(r["forward max |err|"], r["weight-grad max |err|"]) for r in rows)


def _report(rows: list[dict], world_size: int, size: int, compiler: str) -> str:
    from tabulate import tabulate

    worst = _worst(rows)
    verdict = "matches one device" if worst <= 1e-5 else "DIFFERS from one device"
    shown = [{k: f"{v:.2e}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return (f"fxhalo demo: {size}x{size} field sharded along H over {world_size} ranks, compiler={compiler}\n"
            + tabulate(shown, headers="keys", disable_numparse=True)
            + f"\nresult: {verdict} (worst abs error {worst:.2e}, tolerance 1e-5)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxhalo.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--size", type=int, default=64, help="global field size (H = W)")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    args = parser.parse_args(argv)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
        row = run(rank, world_size, args.size, args.compiler, args.steps)
        rows: list = [None] * world_size
        dist.all_gather_object(rows, row)
        if rank == 0:
            print(_report(rows, world_size, args.size, args.compiler))
        dist.destroy_process_group()
    else:
        rows = run_ranks(run, args.ranks, args.size, args.compiler, args.steps, timeout=900)
        print(_report(rows, args.ranks, args.size, args.compiler))
    return 0 if _worst(rows) <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
