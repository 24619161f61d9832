"""2-D against 1-D domains on the same ranks: a UNet at 512² as 4 x 1 (H over 4 ranks) and as 2 x 2
(H and W over 2 each), side by side in one run.

::

    python -m benchmarks.mesh [--size 512] [--repeats 5] [--compiler aot_eager]

Spawns 4 ranks.  For each layout every rank compiles the model with
``options={"group": mesh, "shard_dim": (2, 3)}`` on its block (the 4 x 1 mesh's W axis
has one rank, so nothing is split along W: the 1-D domain) and prints, per rank per
training step (forward + backward):

- the median step time;
- what the compiled graphs send (:func:`benchmarks.comm.counting_compiler`): the halo
  bytes and collectives, counted on the model without its GroupNorms and with
  ``grad_sync=False`` (on gloo fxhalo sums small tensors by an all-to-all too, so only
  there is every all-to-all a halo exchange), and everything the real model sends
  (halos, norm statistics, the gradient sum);
- the analytic minimum of the halo bytes, worked out from the model alone (below),
  and the ratio of the halo bytes to it.

**Minimum.**  The model runs once on the meta device; for every convolution (plain or
transposed) and every rank's output block, the input rows and columns the block reads
are intervals along H and W; the values of their product that lie inside the tensor and
outside the rank's own block must be received (forward), and their gradients sent back
(backward, when the input needs one).  Averaged over the ranks.

Model: :class:`MeshUNet`, the two-level UNet of ``tests/distributed/test_mesh.py`` made
wider: 3x3 convs with GroupNorm, a k4/s2 conv down, a k4/s2 transposed conv up, a skip
``cat``, every op one that runs on a 2-D mesh.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.comm import Tally, counting_compiler
from fxhalo.launch import run_ranks

aten = torch.ops.aten


class MeshUNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(4, b), nn.SiLU())

        self.enc = block(1, width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU())
        self.mid = block(2 * width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.dec = block(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        skip = self.enc(x)
        h = self.up(self.mid(self.down(skip)))
        return self.head(self.dec(torch.cat([h, skip], 1)))


def _balanced(n: int, p: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, p)
    out, start = [], 0
    for r in range(p):
        stop = start + base + (r < extra)
        out.append((start, stop))
        start = stop
    return out


def _reads(o0: int, o1: int, k: int, s: int, pad: int, d: int, transposed: bool, n_in: int) -> tuple[int, int]:
    """The input interval ``[a, b)`` (clipped to ``[0, n_in)``) that output rows ``[o0, o1)`` read."""
    if transposed:  # input i feeds outputs i*s - pad + j*d, j < k
        a = -((-(o0 + pad - (k - 1) * d)) // s)  # ceil
        b = (o1 - 1 + pad) // s + 1
    else:
        a, b = o0 * s - pad, (o1 - 1) * s - pad + (k - 1) * d + 1
    return max(a, 0), min(b, n_in)


class _MeshMinimum(TorchDispatchMode):
    """Halo values a rank must receive, summed over the convs of one forward, averaged over the ranks."""

    def __init__(self, mesh_shape: tuple[int, int]):
        super().__init__()
        self.mesh_shape = mesh_shape
        self.bytes = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is aten.convolution:
            x, w, _, stride, padding, dilation, transposed = args[:7]
            plane = x.shape[0] * x.shape[1] * x.element_size()
            total = 0
            ph, pw = self.mesh_shape
            out_h, out_w = _balanced(out.shape[2], ph), _balanced(out.shape[3], pw)
            in_h, in_w = _balanced(x.shape[2], ph), _balanced(x.shape[3], pw)
            k = w.shape[2:]
            for a in range(ph):
                for b in range(pw):
                    need = [
                        _reads(*o, k[i], stride[i], padding[i], dilation[i], transposed, x.shape[2 + i])
                        for i, o in enumerate((out_h[a], out_w[b]))
                    ]
                    own = [in_h[a], in_w[b]]
                    area = (need[0][1] - need[0][0]) * (need[1][1] - need[1][0])
                    inter = [max(0, min(n[1], m[1]) - max(n[0], m[0])) for n, m in zip(need, own)]
                    total += area - inter[0] * inter[1]
            passes = 1 + x.requires_grad
            self.bytes += passes * total * plane / (ph * pw)
        return out


def minimum_halo_bytes(model: nn.Module, x: torch.Tensor, mesh_shape: tuple[int, int]) -> float:
    rec = _MeshMinimum(mesh_shape)
    with rec:
        copy.deepcopy(model).to("meta")(torch.empty(x.shape, device="meta"))
    return rec.bytes


def _without_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GroupNorms are identities: the same convs, halos only."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, nn.Identity())
    return out


def _block(x, mesh_shape, coord):
    for dim, p, c in ((2, mesh_shape[0], coord[0]), (3, mesh_shape[1], coord[1])):
        a, b = _balanced(x.shape[dim], p)[c]
        x = x.narrow(dim, a, b - a)
    return x.contiguous()


def _rank(rank: int, world_size: int, layouts, size: int, repeats: int, compiler: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size)
    out = {}
    for shape in layouts:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=(f"h{shape[0]}", f"w{shape[1]}"))
        coord = tuple(mesh.get_coordinate())
        local = _block(x, shape, coord)  # data: no gradient
        torch.manual_seed(1)
        model = MeshUNet()
        options = {"group": mesh, "shard_dim": (2, 3)}
        counts = {}
        # On gloo fxhalo sums small tensors (norm statistics, the gradient buckets) by an all-to-all too, so
        # the halo bytes are counted on the model without its norms and without grad_sync, where every
        # all-to-all is a halo exchange; everything the real model sends is counted as well.
        for what, counted_model, sync in (("halo", _without_norms(model), False), ("all", model, True)):
            tally = Tally()
            torch._dynamo.reset()
            counted = torch.compile(
                copy.deepcopy(counted_model),
                backend="domain_parallel",
                options={**options, "grad_sync": sync, "compiler": counting_compiler(tally)},
            )
            y = counted(local)
            y.backward(torch.ones_like(y))
            counts[what] = tally.as_dict()
        torch._dynamo.reset()
        timed = torch.compile(model, backend="domain_parallel", options={**options, "compiler": compiler})
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            y = timed(local)
            y.backward(torch.ones_like(y))
            times.append(time.perf_counter() - start)
            torch.distributed.barrier()
        out[shape] = {"counts": counts, "median_s": statistics.median(times[1:]), "block": tuple(local.shape[2:])}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiler", default="aot_eager")
    args = parser.parse_args(argv)
    layouts = [(4, 1), (2, 2)]
    per_rank = run_ranks(_rank, 4, layouts, args.size, args.repeats, args.compiler, timeout=3600)
    x = torch.randn(1, 1, args.size, args.size)
    print(f"MeshUNet(width=8) on [1, 1, {args.size}, {args.size}], 4 ranks, {args.compiler}; per rank per step")
    print(
        "layout | block (rank 0) | step ms (median, slowest rank) | halo bytes | minimum | ratio | "
        "halo collectives | all bytes sent | all collectives"
    )
    for shape in layouts:
        rows = [r[shape] for r in per_rank]
        halo, calls = (
            statistics.mean(r["counts"]["halo"][what]["exchange"] for r in rows) for what in ("bytes", "calls")
        )
        sent, all_calls = (
            statistics.mean(sum(r["counts"]["all"][what].values()) for r in rows) for what in ("bytes", "calls")
        )
        minimum = minimum_halo_bytes(MeshUNet(), x, shape)
        step = max(r["median_s"] for r in rows) * 1e3
        print(
            f"{shape[0]} x {shape[1]} | {rows[0]['block']} | {step:.0f} | {halo:,.0f} | {minimum:,.0f} | "
            f"{halo / minimum:.3f} | {calls:.0f} | {sent:,.0f} | {all_calls:.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
