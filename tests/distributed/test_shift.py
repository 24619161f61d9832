"""Padding, rolls, flips and pixel shuffles along the sharded dim, on 2, 3 and 4 ranks.

One spawned group per world size runs:

- a random sweep of standalone ``F.pad`` (every mode, negative pads, other dims
  padded too), ``torch.roll`` (shifts longer than a shard, several dims),
  ``torch.flip`` and ``pixel_shuffle`` / ``pixel_unshuffle``, each compiled on its
  own and compared with one device: forward slab, input gradient and (for the
  cases with a conv after the op) weight gradients summed over ranks;
- a Swin-style shifted window block: roll, window partition, a per-window op,
  window reverse, roll back;
- the refusals, each with a remedy.
"""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.harness import check_against_one_device, check_many_against_one_device, run_ranks, sweep_compiler
from tests.models import WindowConvBlock

N_CASES = 20  # per world size


class Op(nn.Module):
    """``fn(x, *args, **kwargs)``, optionally followed by a 1x3 conv (a weight to check gradients on)."""

    def __init__(self, fn, *args, conv=False, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.conv = nn.Conv2d(2, 2, (1, 3), padding=(0, 1)) if conv else None

    def forward(self, x):
        y = self.fn(x, *self.args, **self.kwargs)
        return self.conv(y) if self.conv is not None else y

    def __repr__(self):
        return f"{getattr(self.fn, '__name__', self.fn)}{self.args}{self.kwargs}" + (" + conv" if self.conv else "")


def _pad_case(rng, P, h):
    mode = rng.choice(["constant", "constant", "reflect", "replicate", "circular"])
    n = h * P
    # torch's own limits, which Dynamo checks on the local slab while tracing: a reflect pad
    # must be shorter than the (local) dim, a circular pad no longer than it.
    limit = {"reflect": h - 1, "circular": h}.get(mode, 2 * h + 1)
    while True:
        lo = rng.randint(-2 if mode == "constant" else 0, limit)
        hi = rng.randint(-2 if mode == "constant" else 0, limit)
        if (n + lo + hi) % P == 0 and n + lo + hi >= P:
            break
    w = [rng.randint(0, 2), rng.randint(0, 2)]
    value = round(rng.uniform(-2, 2), 2) if mode == "constant" else None
    kw = {"value": value} if value is not None else {}
    return Op(F.pad, (w[0], w[1], lo, hi), mode=mode, conv=rng.random() < 0.3, **kw), 2


def _roll_case(rng, P, h):
    n = h * P
    shift = rng.randint(-2 * n, 2 * n)
    if rng.random() < 0.5:
        return Op(torch.roll, shift, 2, conv=rng.random() < 0.3), 2
    return Op(torch.roll, (shift, rng.randint(-3, 3)), (-2, 3)), 2


def _flip_case(rng, P, h):
    dims = rng.choice([(2,), (2, 3), (1, 2), (-2,), (0, 2, 3)])
    return Op(torch.flip, dims, conv=rng.random() < 0.3), 2


def _shuffle_case(rng, P, h):
    if rng.random() < 0.5:
        return Op(F.pixel_shuffle, 2), 8  # channels 8 -> 2, rows double
    return Op(F.pixel_unshuffle, 2), 2


FAMILIES = {"pad": _pad_case, "roll": _roll_case, "flip": _flip_case, "shuffle": _shuffle_case}


def _sweep(world_size):
    """The random cases, compiled together as one graph (each still checked and reported on its own)."""
    rng = random.Random(world_size)
    families, cases = [], []
    for i in range(N_CASES):
        family = list(FAMILIES)[i % len(FAMILIES)]
        h = rng.choice([2, 3, 4]) if family != "shuffle" else 2 * rng.choice([1, 2])
        torch.manual_seed(i)  # the same conv weights on every rank
        model, channels = FAMILIES[family](rng, world_size, h)
        families.append(family)
        cases.append((model, torch.randn(2, channels, h * world_size, 6), i))
    all_checks = check_many_against_one_device(
        cases, options={"compiler": sweep_compiler(world_size)}, return_exceptions=True
    )
    results = []
    for family, (model, _, _), checks in zip(families, cases, all_checks):
        if isinstance(checks, Exception):  # reported per case
            results.append((family, repr(model), [f"{type(checks).__name__}: {checks}"], float("inf")))
        else:
            failed = [k for k, (ok, _) in checks.items() if not ok]
            results.append((family, repr(model), failed, max(e for _, e in checks.values())))
    return results


class ShiftedWindowBlock(nn.Module):
    """Swin's shifted-window step on NHWC, H sharded: roll, partition, per-window op, reverse, roll back."""

    def __init__(self, ws=2, channels=4):
        super().__init__()
        self.ws = ws
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, H, W, C = x.shape
        ws, s = self.ws, self.ws // 2
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        win = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        win = self.proj(win)
        win = win + torch.softmax(win, dim=1) * win.mean(dim=1, keepdim=True)  # mixes tokens within a window
        x = win.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return torch.roll(x, shifts=(s, s), dims=(1, 2))


def _swin(world_size):
    torch.manual_seed(3)
    model = ShiftedWindowBlock()
    x = torch.randn(2, 4 * world_size, 6, 4)
    checks = check_against_one_device(model, x, shard_dim=1, options={"compiler": "aot_eager"})
    return {k: ok for k, (ok, _) in checks.items()}


def _windows(world_size):
    torch.manual_seed(4)
    model = WindowConvBlock()  # tests/models.py
    x = torch.randn(2, 4, 4 * world_size, 6)
    checks = check_against_one_device(model, x, shard_dim=2, options={"compiler": "aot_eager"})
    return {k: ok for k, (ok, _) in checks.items()}


def _refusals(world_size):
    import fxhalo

    out = {}
    cases = {
        "roll_flat": (Op(torch.roll, 1), torch.randn(1, 2, 4 * world_size, 4)),
    }
    for name, (model, x) in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="domain_parallel", options={"compiler": "aot_eager"})
        try:
            compiled(fxhalo.domain.shard(x, 2))
            out[name] = ("ran", "")
        except fxhalo.FxHaloError as e:
            out[name] = ("FxHaloError", str(e))
    return out


def _run(rank, world_size):
    return {
        "sweep": _sweep(world_size),
        "swin": _swin(world_size),
        "windows": _windows(world_size),
        "refusals": _refusals(world_size),
    }


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"P{p}")
def ranks(request):
    return request.param, run_ranks(_run, request.param, timeout=300)


@pytest.mark.timeout(330)
def test_sweep_matches_one_device(ranks):
    world_size, per_rank = ranks
    failures = [(r, c) for r, res in enumerate(per_rank) for c in res["sweep"] if c[2]]
    assert not failures, failures[:8]
    families = {c[0] for c in per_rank[0]["sweep"]}
    assert families == set(FAMILIES)


@pytest.mark.timeout(330)
def test_swin_shifted_window_matches_one_device(ranks):
    _, per_rank = ranks
    for rank, res in enumerate(per_rank):
        assert all(res["swin"].values()), (rank, res["swin"])


@pytest.mark.timeout(330)
def test_convs_norms_and_attention_inside_windows_match_one_device(ranks):
    """The shard in the window (batch) dim: local for every op inside the windows, exact on every rank."""
    _, per_rank = ranks
    for rank, res in enumerate(per_rank):
        assert all(res["windows"].values()) and len(res["windows"]) >= 5, (rank, res["windows"])


@pytest.mark.timeout(330)
def test_refusals_name_the_op_and_a_remedy(ranks):
    _, per_rank = ranks
    for res in per_rank:
        for name, (kind, msg) in res["refusals"].items():
            assert kind == "FxHaloError", (name, msg)
            assert "Remedy" in msg, (name, msg)
