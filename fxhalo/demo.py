"""Train a domain-parallel PDE surrogate you can watch: ``python -m fxhalo.demo``.

It spawns ``--ranks`` gloo processes on this machine (or, under
``torchrun --nproc-per-node N -m fxhalo.demo``, joins torchrun's group) and:

1. solves 2-D advection-diffusion, ``u_t + c·∇u = ν∇²u``, with numpy (explicit
   upwind finite differences, periodic in x, walls in y) from smooth random
   initial fields;
2. trains ``fxhalo.models.SmallUNet`` to predict the field 8 solver steps
   ahead, sharded along H (the rows) over the ranks, compiled with
   ``backend="domain_parallel"`` and called on DomainTensors (Dynamo traces the
   global program); the MSE loss is computed inside the compiled model, so it is
   the global mean and the same on every rank;
3. trains an identical model on one device (rank 0, the whole field, the same
   initial weights, batches and steps) and prints the largest differences of
   the predictions and of the parameters;
4. draws input, target, the prediction gathered from the ranks (shard
   boundaries as horizontal lines) and its error to a PNG, when matplotlib (the
   ``plot`` extra) is installed.

The default inner compiler is ``aot_eager``: Inductor's C++ compile of the
UNet's forward and backward takes minutes on a small CPU machine.  Pass
``--compiler inductor`` to use it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .construct import shard
from .domain import Domain
from .launch import run_ranks
from .models import SmallUNet
from .tensor import gather

#: parity verdict: the largest parameter difference allowed after training (fp32 sums in a
#: different order drift by ~1e-7 per step; Adam's normalised steps can amplify that a little)
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
    size: int = 64
    steps: int = 150
    compiler: str = "aot_eager"
    batch: int = 4
    samples: int = 64
    lead: int = 8
    lr: float = 3e-3
    seed: int = 0


# -- the data: a numpy advection-diffusion solver ------------------------------------------------


def advect_diffuse(
    u: np.ndarray, steps: int, *, cx: float = 1.0, cy: float = 0.5, nu: float = 0.2, dt: float = 0.25
) -> np.ndarray:
    """``steps`` explicit steps of ``u_t + c·∇u = ν∇²u`` on ``u`` of shape ``(B, H, W)``.

    Grid spacing 1.  x (W) is periodic; y (H) has zero-flux walls (ghost rows copy
    the edge).  Advection is first-order upwind (``cx, cy > 0``), diffusion the
    5-point Laplacian.  ``dt·(|cx| + |cy|) + 4·ν·dt <= 1`` keeps the scheme monotone:
    0.575 with the defaults.
    """
    assert cx > 0 and cy > 0 and dt * (cx + cy) + 4 * nu * dt <= 1, "unstable solver settings"
    for _ in range(steps):
        g = np.pad(u, ((0, 0), (1, 1), (0, 0)), mode="edge")  # walls in y
        g = np.pad(g, ((0, 0), (0, 0), (1, 1)), mode="wrap")  # periodic in x
        north, south = g[:, :-2, 1:-1], g[:, 2:, 1:-1]
        west, east = g[:, 1:-1, :-2], g[:, 1:-1, 2:]
        laplacian = north + south + west + east - 4 * u
        # upwind: the flow comes from the west and the north, so differences look that way
        u = u + dt * (nu * laplacian - cx * (u - west) - cy * (u - north))
    return u


def initial_fields(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Smooth random fields: a few Gaussian blobs each, wrapped around in x."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    u = np.zeros((count, size, size))
    for i in range(count):
        for _ in range(rng.integers(3, 7)):
            y0, x0 = rng.uniform(0, size, 2)
            width = rng.uniform(0.05, 0.15) * size
            dx = (x - x0 + size / 2) % size - size / 2  # periodic distance in x
            u[i] += rng.uniform(-1, 1) * np.exp(-((y - y0) ** 2 + dx**2) / (2 * width**2))
    return u


def make_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``(samples + batch, 1, size, size)`` float32: ``u_t`` and ``u_{t+lead}``.

    Every rank builds the same arrays from the same seed (cheap), then keeps its rows.
    The last ``batch`` samples are held out for the parity check and the picture.
    """
    rng = np.random.default_rng(cfg.seed)
    u0 = initial_fields(rng, cfg.samples + cfg.batch, cfg.size)
    u_t = advect_diffuse(u0, 4)  # a short spin-up, so that inputs already look like solutions
    u_next = advect_diffuse(u_t, cfg.lead)
    as_tensor = lambda a: torch.from_numpy(a[:, None].astype(np.float32))  # noqa: E731
    return as_tensor(u_t), as_tensor(u_next)


# -- the model ----------------------------------------------------------------------------------


class Surrogate(nn.Module):
    """The UNet and its loss in one module, so that the loss is compiled with it.

    Inside the compiled graph ``F.mse_loss`` over two sharded tensors becomes the
    global mean (one all_reduce): the same number on every rank, and the gradient of
    one device.
    """

    def __init__(self):
        super().__init__()
        self.net = SmallUNet(in_channels=1, out_channels=1, width=8, groups=4)

    def forward(self, x, target):
        pred = x + self.net(x)  # learn the change over the lead time, as PDE surrogates usually do
        return F.mse_loss(pred, target), pred


def _batches(cfg: Config):
    """The same sequence of training-sample indices on every rank and for the reference."""
    rng = np.random.default_rng(cfg.seed + 1)
    for _ in range(cfg.steps):
        yield torch.from_numpy(rng.choice(cfg.samples, cfg.batch, replace=False))


class Progress:
    """A one-line progress bar on a terminal (``\\r``), or a line every tenth of the run otherwise."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, loss: float) -> None:
        if not self.tty and done != self.total and done % max(1, self.total // 10):
            return
        width = 24
        bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
        line = f"{self.label} [{bar}] {done}/{self.total}  loss {loss:.3e}  {time.perf_counter() - self.start:5.1f} s"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, progress: Progress | None, wrap=_whole):
    """Adam on ``cfg.steps`` batches; returns the last loss.  ``wrap`` makes each batch the model's input
    (a DomainTensor for the sharded run: each rank keeps its rows, no communication)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss = torch.zeros(())
    for step, idx in enumerate(_batches(cfg), start=1):
        opt.zero_grad(set_to_none=True)
        loss, _ = model(wrap(x[idx]), wrap(y[idx]))
        loss.backward()  # with grad_sync every rank now holds the full, identical gradient
        opt.step()
        if progress is not None:
            progress.update(step, loss.item())
    return loss.item()


def run(rank: int, world_size: int, cfg: Config) -> dict:
    """One rank's part: train sharded; rank 0 also trains the one-device reference."""
    x, y = make_data(cfg)
    held_x, held_y = x[-cfg.batch :], y[-cfg.batch :]
    x, y = x[: cfg.samples], y[: cfg.samples]

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Surrogate()
    reference = copy.deepcopy(model)  # before compiling: a plain module for the one-device run
    # In place (not torch.compile(model)): the state-dict keys stay those of the plain model.
    model.compile(backend="domain_parallel", options={"compiler": cfg.compiler})

    def rows_of(t):  # the global batch as a DomainTensor: this rank's rows inside
        return shard(t, shard_dim=2)

    if rank == 0:
        print(f"compiling with {cfg.compiler} (the first step traces, rewrites and compiles the model) ...", flush=True)
    t0 = time.perf_counter()
    progress = Progress(cfg.steps, f"rank 0 of {world_size}") if rank == 0 else None
    loss = train(model, x, y, cfg, progress, wrap=rows_of)
    seconds = time.perf_counter() - t0

    # The held-out batch has the training batch's size, so the compiled graph is reused.
    held_loss, pred_global = model(rows_of(held_x), rows_of(held_y))
    pred = gather(pred_global).detach()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = pred_global.to_local().shape[2]
    out = {"rank": rank, "rows": rows, "loss": loss, "held_loss": held_loss.item(), "seconds": seconds}
    if rank != 0:
        return out

    # One device, the whole field, the same steps: what the sharded run must reproduce.
    t0 = time.perf_counter()
    train(reference, x, y, cfg, None)
    with torch.no_grad():
        ref_loss, ref_pred = reference(held_x, held_y)
    ref_params = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    out.update(
        reference_seconds=time.perf_counter() - t0,
        reference_held_loss=ref_loss.item(),
        persistence_loss=F.mse_loss(held_x, held_y).item(),  # "tomorrow = today", the baseline to beat
        pred_diff=(pred - ref_pred).abs().max().item(),
        param_diff=(params - ref_params).abs().max().item(),
        picture=(held_x[0, 0].numpy(), held_y[0, 0].numpy(), pred[0, 0].numpy()),
        boundaries=[b for _, b in Domain("demo", 0, world_size).partition(cfg.size)][:-1],
    )
    return out


# -- reporting ----------------------------------------------------------------------------------


def report(rows: list[dict], world_size: int, cfg: Config) -> str:
    r0 = rows[0]
    ok = r0["param_diff"] <= TOLERANCE
    shards = "+".join(str(r["rows"]) for r in rows)
    return "\n".join(
        [
            f"trained {cfg.steps} Adam steps on {world_size} ranks in {r0['seconds']:.1f} s (the first step compiles), "
            f"on one device in {r0['reference_seconds']:.1f} s",
            f"held-out MSE: sharded {r0['held_loss']:.3e}, one device {r0['reference_held_loss']:.3e}, "
            f"persistence baseline {r0['persistence_loss']:.3e}",
            f"parity with one device ({shards} rows): max |prediction diff| {r0['pred_diff']:.2e}, "
            f"max |parameter diff| {r0['param_diff']:.2e} -> "
            + ("matches one device" if ok else f"DIFFERS from one device (tolerance {TOLERANCE:g})"),
        ]
    )


def draw(path: str, picture, boundaries, world_size: int, lead: int) -> str:
    """Write the four panels to ``path``; returns a line for the report."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no picture written"
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    u_t, target, pred = picture
    panels = [
        ("input $u_t$", u_t),
        (f"target $u_{{t+{lead}}}$", target),
        (f"prediction, gathered from {world_size} ranks", pred),
        ("error (prediction - target)", pred - target),
    ]
    lim = max(abs(u_t).max(), abs(target).max())
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), constrained_layout=True)
    for i, (ax, (title, field)) in enumerate(zip(axes, panels)):
        err = i == 3
        scale = abs(field).max() if err else lim
        im = ax.imshow(field, cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= 2:  # where the ranks' slabs meet
            for b in boundaries:
                ax.axhline(b - 0.5, color="k", lw=1, ls="--")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"fxhalo demo: advection-diffusion {lead} solver steps ahead, SmallUNet sharded along H over "
        f"{world_size} ranks (dashed: shard edges)"
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


def _finish(rows: list[dict], world_size: int, cfg: Config, png: str | None) -> int:
    print(report(rows, world_size, cfg))
    if png:
        print(draw(png, rows[0]["picture"], rows[0]["boundaries"], world_size, cfg.lead))
    return 0 if rows[0]["param_diff"] <= TOLERANCE else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fxhalo.demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
        epilog="Under torchrun: torchrun --nproc-per-node N -m fxhalo.demo [options] (--ranks is then ignored).",
    )
    parser.add_argument("--ranks", type=int, default=2, help="processes to spawn (default 2; ignored under torchrun)")
    parser.add_argument(
        "--size",
        type=int,
        default=Config.size,
        help="global field size H = W (default 64); each rank needs an even number of rows",
    )
    parser.add_argument("--steps", type=int, default=Config.steps, help="training steps (default 150)")
    parser.add_argument(
        "--compiler",
        default=Config.compiler,
        choices=["aot_eager", "inductor", "eager"],
        help="inner compiler (default aot_eager; inductor compiles for minutes on a small CPU)",
    )
    parser.add_argument("--png", default="fxhalo_demo.png", help="picture path (default fxhalo_demo.png)")
    parser.add_argument("--no-png", action="store_true", help="do not draw the picture")
    args = parser.parse_args(argv)
    cfg = Config(size=args.size, steps=args.steps, compiler=args.compiler)
    png = None if args.no_png else args.png

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.ranks
    # Dynamo traces each rank's slab on its own: the UNet's x2 upsample must give back the local height
    # for the skip concatenation and the residual, so every rank needs an even number of rows.
    if cfg.size % (2 * world_size) or cfg.size < 4 * world_size:
        good = max(4, -(-cfg.size // (2 * world_size)) * 2) * world_size
        parser.error(
            f"SmallUNet's down- and upsampling need an even number of rows, at least 4, on each of the "
            f"{world_size} ranks, which --size {cfg.size} does not give; try --size {good}"
        )
    if cfg.steps < 1:
        parser.error("--steps must be at least 1")
    if not torchrun or os.environ["RANK"] == "0":
        print(
            f"fxhalo demo: {cfg.size}x{cfg.size} advection-diffusion field sharded along H over {world_size} "
            f"ranks, SmallUNet, compiler={cfg.compiler}",
            flush=True,
        )

    if torchrun:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        row = run(dist.get_rank(), world_size, cfg)
        rows: list = [None] * world_size
        dist.all_gather_object(rows, row)
        code = _finish(rows, world_size, cfg, png) if dist.get_rank() == 0 else 0
        dist.destroy_process_group()
        return code
    rows = run_ranks(run, world_size, cfg, timeout=900)
    return _finish(rows, world_size, cfg, png)


if __name__ == "__main__":
    raise SystemExit(main())
