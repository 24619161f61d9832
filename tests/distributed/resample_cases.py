"""Random resampling configurations (transposed conv, pooling, interpolation) and the per-case check.

A case is a small module with one resampling op, the local input shape and the
sharded dim.  Its check compiles the module with the domain_parallel backend and
compares, against one device on the full tensor:

- ``out``: the forward slab (a wrong window, edge rule or source coordinate, often on edge ranks);
- ``indices``: max-pool indices, exactly (they must refer to the global input);
- ``grad_in``: the input-gradient slab (halo gradients not returned to their owner);
- ``grad_*``: weight gradients summed over ranks (transposed conv only).
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxhalo
from tests.harness import close

SMOOTH_MODES = {1: ("linear",), 2: ("bilinear", "bicubic"), 3: ("trilinear",)}
SCALES = (0.5, 0.75, 1.5, 2.0, 2.5, 3.0, 4 / 3, 0.6, 1.25, 1.75)


class Op(nn.Module):
    """``fn(x, **kwargs)`` as a module; ``fn`` is a torch function, so the case is picklable."""

    def __init__(self, fn, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x):
        return self.fn(x, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # "conv_transpose", "max_pool", "avg_pool", "adaptive_avg", "adaptive_max", "interpolate"
    nd: int
    shard_dim: int
    local: tuple  # local input shape, batch and channels included
    params: tuple  # the op's keyword arguments, as sorted (name, value) pairs

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def module(self) -> nn.Module:
        kw, nd = self.kwargs, self.nd
        if self.family == "conv_transpose":
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
            return cls(self.local[1], **kw)
        fn = {
            "max_pool": getattr(F, f"max_pool{nd}d"),
            "avg_pool": getattr(F, f"avg_pool{nd}d"),
            "adaptive_avg": getattr(F, f"adaptive_avg_pool{nd}d"),
            "adaptive_max": getattr(F, f"adaptive_max_pool{nd}d"),
            "interpolate": F.interpolate,
        }[self.family]
        return Op(fn, **kw)

    def global_shape(self, world_size: int) -> tuple:
        shape = list(self.local)
        shape[self.shard_dim] *= world_size
        return tuple(shape)

    @property
    def returns_indices(self) -> bool:
        return bool(self.kwargs.get("return_indices"))

    @property
    def category(self) -> str:
        kw = self.kwargs
        if self.family == "interpolate":
            return f"interpolate {kw['mode']}"
        if self.family == "max_pool" and self.returns_indices:
            return "max_pool indices"
        return self.family


def _torch_disagrees_with_itself(case: Case, world_size: int) -> bool:
    """``nearest`` with a scale factor whose output keeps an axis' length (or doubles it).

    Torch maps such an axis three ways: its eager 2-D forward kernel and every eager
    backward kernel copy (or halve) the index, the eager 1-D and 3-D forward kernels and
    the decomposition that ``torch.compile`` runs apply the scale.  The eager gradient is
    then not the gradient of the eager forward, with or without fxhalo, so such a case
    cannot be checked against one device.
    """
    kw = case.kwargs
    if (
        case.family != "interpolate"
        or kw["mode"] != "nearest"
        or "scale_factor" not in kw
        or kw.get("recompute_scale_factor")
    ):
        return False
    sizes = case.global_shape(world_size)[2:]
    return any(int(n * s) in (n, 2 * n) and s not in (1.0, 2.0) for n, s in zip(sizes, kw["scale_factor"]))


def _valid(case: Case, world_size: int) -> bool:
    """Torch must accept the op on the local slab (what Dynamo traces) and on the global tensor,
    and the global output must split evenly over the ranks."""
    if _torch_disagrees_with_itself(case, world_size):
        return False
    try:
        with torch.no_grad():
            m = case.module()
            m(torch.zeros(case.local))
            out = m(torch.zeros(case.global_shape(world_size)))
    except (RuntimeError, ValueError):
        return False
    out = out[0] if isinstance(out, tuple) else out
    return out.shape[case.shard_dim] % world_size == 0 and out.shape[case.shard_dim] >= world_size


def _spatial(rng, nd, low, high):
    return [rng.randint(low, high) for _ in range(nd)]


def _reaching(rng, nd, axis, low, high):
    """Kernel sizes; along the sharded axis mostly wider than 1, so that most windows need a halo."""
    k = _spatial(rng, nd, low, high)
    if rng.random() < 0.8:
        k[axis] = rng.randint(2, high + 1)
    return k


def _conv_transpose(rng, nd, axis):
    k = _reaching(rng, nd, axis, 1, 4)
    s = _spatial(rng, nd, 1, 3)
    d = [rng.choice([1, 1, 2]) for _ in range(nd)]
    p = [rng.randint(0, d[i] * (k[i] - 1)) for i in range(nd)]
    op = [rng.randint(0, max(s[i], d[i]) - 1) for i in range(nd)]
    groups = rng.choice([1, 1, 2])
    out_ch = groups * rng.randint(1, 2)
    return groups * rng.randint(1, 2), dict(
        out_channels=out_ch,
        kernel_size=tuple(k),
        stride=tuple(s),
        padding=tuple(p),
        output_padding=tuple(op),
        groups=groups,
        dilation=tuple(d),
        bias=rng.random() < 0.7,
    )


def _max_pool(rng, nd, axis):
    k = _reaching(rng, nd, axis, 1, 4)
    kw = dict(
        kernel_size=tuple(k),
        stride=rng.choice([None, tuple(_spatial(rng, nd, 1, 3))]),
        padding=tuple(rng.randint(0, ki // 2) for ki in k),
        dilation=tuple(rng.choice([1, 1, 2]) for _ in range(nd)),
        ceil_mode=rng.random() < 0.4,
        return_indices=rng.random() < 0.4,
    )
    return kw


def _avg_pool(rng, nd, axis):
    k = _reaching(rng, nd, axis, 1, 4)
    kw = dict(
        kernel_size=tuple(k),
        stride=rng.choice([None, tuple(_spatial(rng, nd, 1, 3))]),
        padding=tuple(rng.randint(0, ki // 2) for ki in k),
        ceil_mode=rng.random() < 0.5,
        count_include_pad=rng.random() < 0.5,
    )
    if nd > 1 and rng.random() < 0.2:
        kw["divisor_override"] = rng.randint(1, 5)
    return kw


def _adaptive(rng, nd, world_size, n_global, axis):
    sizes = _spatial(rng, nd, 1, 4)
    sizes[axis] = world_size * rng.randint(1, max(1, (2 * n_global) // world_size))
    out = tuple(sizes) if nd > 1 or rng.random() < 0.5 else sizes[0]
    return dict(output_size=out)


def _interpolate(rng, nd, world_size, n_global, axis, other):
    mode = rng.choice(SMOOTH_MODES[nd] if rng.random() < 0.6 else ("nearest", "nearest-exact"))
    kw = dict(mode=mode)
    if mode not in ("nearest", "nearest-exact"):
        kw["align_corners"] = rng.random() < 0.5
    if rng.random() < 0.4:
        sizes = [rng.randint(1, 2 * o + 1) for o in other]
        sizes[axis] = world_size * rng.randint(1, max(1, (3 * n_global) // world_size))
        kw["size"] = tuple(sizes)
    else:
        kw["scale_factor"] = tuple(rng.choice(SCALES) for _ in range(nd))
        kw["recompute_scale_factor"] = rng.choice([None, None, True, False])
    return kw


def random_case(rng: random.Random, world_size: int, family: str) -> Case:
    nd = rng.choice([1, 2, 2, 3])
    axis = rng.randrange(nd) if rng.random() < 0.5 else 0
    spatial = _spatial(rng, nd, 2, 5 if nd == 3 else 7)
    spatial[axis] = rng.choice([1, 2, 2, 3, 4, 5, 6])
    channels, batch = rng.randint(1, 3), rng.choice([1, 2])
    n_global = spatial[axis] * world_size
    if family == "conv_transpose":
        channels, kw = _conv_transpose(rng, nd, axis)
    elif family == "max_pool":
        kw = _max_pool(rng, nd, axis)
    elif family == "avg_pool":
        kw = _avg_pool(rng, nd, axis)
    elif family in ("adaptive_avg", "adaptive_max"):
        kw = _adaptive(rng, nd, world_size, n_global, axis)
        if family == "adaptive_max":
            kw["return_indices"] = rng.random() < 0.4
    else:
        kw = _interpolate(rng, nd, world_size, n_global, axis, spatial)
    local = (batch, channels, *spatial)
    return Case(family, nd, 2 + axis, local, tuple(sorted(kw.items())))


#: the families in the order cases are drawn: every 10 cases, 2 transposed convs, 2 max pools
#: (some with indices), 1 average pool, 2 adaptive pools and 3 interpolations
FAMILIES = (
    "conv_transpose",
    "max_pool",
    "interpolate",
    "avg_pool",
    "adaptive_avg",
    "conv_transpose",
    "interpolate",
    "max_pool",
    "adaptive_max",
    "interpolate",
)


def random_cases(n: int, world_size: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed * 1000 + world_size)
    cases = []
    while len(cases) < n:
        case = random_case(rng, world_size, FAMILIES[len(cases) % len(FAMILIES)])
        if _valid(case, world_size):
            cases.append(case)
    return cases


def _split(out):
    return out if isinstance(out, tuple) else (out, None)


def run_case(case: Case, world_size: int, compiler, seed: int) -> dict:
    """Compile ``case`` with domain_parallel and compare with one device; returns what matched."""
    torch._dynamo.reset()  # a fresh graph per case: no recompile limits, no cached graphs
    torch.manual_seed(seed)  # the same weights and data on every rank
    m = case.module()
    x = torch.randn(case.global_shape(world_size))
    ref_in = x.clone().requires_grad_()
    ref, ref_idx = _split(m(ref_in))
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    d = case.shard_dim
    x_local = fxhalo.domain.shard(x, d).requires_grad_()
    compiled = torch.compile(m, backend="domain_parallel", options={"compiler": compiler, "shard_dim": d})
    y, idx = _split(compiled(x_local))
    y.backward(fxhalo.domain.shard(grad_out, d))

    checks = {
        "out": close(y, fxhalo.domain.shard(ref.detach(), d)),
        "grad_in": close(x_local.grad, fxhalo.domain.shard(ref_in.grad, d)),
    }
    if ref_idx is not None:
        want = fxhalo.domain.shard(ref_idx, d)
        checks["indices"] = (idx is not None and idx.shape == want.shape and bool((idx == want).all()), 0.0)
    for (name, p), want in zip(m.named_parameters(), ref_grads):
        checks["grad_" + name] = close(p.grad, want)  # grad_sync: every rank holds the full gradient
    return {
        "ok": all(ok for ok, _ in checks.values()),
        "max_err": max(err for _, err in checks.values()),
        "failed": [k for k, (ok, _) in checks.items() if not ok],
    }


class _Cases(nn.Module):
    """Independent cases side by side: ``forward(*xs)`` returns every case's output (a tuple with indices)."""

    def __init__(self, modules):
        super().__init__()
        self.cases = nn.ModuleList(modules)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.cases, xs))


def run_cases(cases: list[Case], world_size: int, compiler, seeds: list[int]) -> list[dict]:
    """:func:`run_case` for many cases of one ``shard_dim``, compiled as ONE graph: the same data
    (same seeds) and the same checks per case, one Dynamo trace and one compile for all.

    The cases share nothing, so one backward over all outputs keeps their gradients
    apart.  If the batch raises, every case runs again on its own (:func:`run_case`),
    so the error belongs to its case as before."""
    (d,) = {case.shard_dim for case in cases}
    modules, xs, refs = [], [], []
    for case, seed in zip(cases, seeds):
        torch.manual_seed(seed)  # the same weights and data on every rank, as run_case draws them
        m = case.module()
        x = torch.randn(case.global_shape(world_size))
        ref_in = x.clone().requires_grad_()
        ref, ref_idx = _split(m(ref_in))
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
        refs.append((ref.detach(), ref_idx, grad_out, ref_in.grad, [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
        modules.append(m)
        xs.append(x)

    torch._dynamo.reset()  # a fresh graph per batch: no recompile limits, no cached graphs
    x_locals = [fxhalo.domain.shard(x, d).requires_grad_() for x in xs]
    batch = _Cases(modules)
    try:
        compiled = torch.compile(batch, backend="domain_parallel", options={"compiler": compiler, "shard_dim": d})
        outs = [_split(o) for o in compiled(*x_locals)]
        torch.autograd.backward([y for y, _ in outs], [fxhalo.domain.shard(r[2], d) for r in refs])
    except Exception:
        batch.zero_grad(set_to_none=True)
        return [run_case(case, world_size, compiler, seed) for case, seed in zip(cases, seeds)]

    results = []
    for m, x_local, (y, idx), (ref, ref_idx, _, ref_in_grad, ref_grads) in zip(modules, x_locals, outs, refs):
        checks = {
            "out": close(y, fxhalo.domain.shard(ref, d)),
            "grad_in": close(x_local.grad, fxhalo.domain.shard(ref_in_grad, d)),
        }
        if ref_idx is not None:
            want = fxhalo.domain.shard(ref_idx, d)
            checks["indices"] = (idx is not None and idx.shape == want.shape and bool((idx == want).all()), 0.0)
        for (name, p), want in zip(m.named_parameters(), ref_grads):
            checks["grad_" + name] = close(p.grad, want)  # grad_sync: every rank holds the full gradient
        results.append(
            {
                "ok": all(ok for ok, _ in checks.values()),
                "max_err": max(err for _, err in checks.values()),
                "failed": [k for k, (ok, _) in checks.items() if not ok],
            }
        )
    return results
