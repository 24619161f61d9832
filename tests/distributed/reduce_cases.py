"""Norm, reduction, loss and softmax cases against one device, on groups of 2, 3 and 4 ranks from one spawn.

A case is a list of :class:`Op`\\ s compiled together into one graph (compiling is
what costs time here).  Each op gets its *own* copies of its input tensors, so one
backward pass gives every op's input gradient separately: a wrong cross-rank term
is pinned to an op.  The reference is the same ops on the global tensors, on one
device.  One row per op holds

- ``out``: its output (a slab, or the replicated value);
- ``grad_<input>``: the gradient of a random upstream gradient w.r.t. its inputs;

and a last row the parameters' gradients (each rank's partial gradient, summed
over the ranks) and the buffers (running statistics).

The inner compiler notes the fxhalo kernels in the rewritten graph and, on 2 ranks,
the collectives in AOTAutograd's forward and backward graphs, so the tests can
assert one collective per op.  On 3 and 4 ranks it runs the rewritten graph eagerly
(``sweep_compiler``): the count of collectives is the pass's decision, the same on any
number of ranks, and AOTAutograd's trace was two thirds of the spawn's time.

Spawning costs seconds per rank, so :func:`results` spawns 4 ranks once and runs
every case on the first 2, 3 and 4 of them (process groups of those sizes; the
other ranks wait), and caches the per-rank results: ``test_norm.py`` and
``test_reduce.py`` share that one spawn.  Running on a sub-group also exercises
``options={"group": ...}``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fxhalo
from tests.harness import close, run_ranks, sweep_compiler

_KERNEL_MODULES = ("fxhalo.ops.norm", "fxhalo.ops.reduce", "fxhalo.ops.loss")


# -- recording the graphs ----------------------------------------------------------


def _collectives(gm) -> list[str]:
    """The functional collectives in an ATen graph, by name (``wait_tensor`` is not one)."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return [n.split(".")[1] for n in names if n.startswith("_c10d_functional.") and "wait_tensor" not in n]


def recording_compiler(log: dict, inner: str = "aot_eager"):
    """The inner compiler: ``aot_eager``, noting fxhalo's kernels and the collectives of its fw/bw graphs;
    with ``inner="eager"``, the rewritten graph as it is, noting the kernels only."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.debugging import aot_eager

    def keep(kind):
        def compiler(gm, example_inputs):
            log.setdefault(kind, []).extend(_collectives(gm))
            return make_boxed_func(gm.forward)

        return compiler

    def compile_fn(gm, example_inputs):
        log.setdefault("kernels", []).extend(
            f"{n.target.__module__.rsplit('.', 1)[-1]}.{n.target.__name__}"
            for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__module__", "").startswith(_KERNEL_MODULES)
        )
        # grad_sync's parameter buckets: one all_reduce each in the backward
        log["buckets"] = log.get("buckets", 0) + sum(
            getattr(n.target, "__name__", "") == "synced_params" for n in gm.graph.nodes
        )
        if inner == "eager":
            return gm.forward
        return aot_eager(gm, example_inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    return compile_fn


# -- cases -------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    """``fn(*inputs)``; ``fn`` may be a module (its parameters and buffers are checked too)."""

    label: str
    fn: Callable
    inputs: tuple[str, ...] = ("x",)


@dataclasses.dataclass
class Case:
    name: str
    ops: list[Op]
    #: step -> the global tensors the ops read, by name
    pool: Callable[[int], dict]
    #: the dim each pool tensor is sharded along (absent: replicated)
    shard: dict
    shard_dim: int = 2
    steps: int = 1
    eval_step: bool = False  # one more step in eval mode
    reference_dtype: torch.dtype = torch.float32

    def modules(self) -> list[nn.Module]:
        return [op.fn for op in self.ops if isinstance(op.fn, nn.Module)]


def _apply(ops: list[Op]):
    """The function to compile: each op on its own copies of its inputs."""

    def apply(inputs):
        return tuple(op.fn(*(inputs[f"{i}:{name}"] for name in op.inputs)) for i, op in enumerate(ops))

    return apply


def _per_op(case: Case, pool: dict) -> dict:
    return {f"{i}:{name}": pool[name] for i, op in enumerate(case.ops) for name in op.inputs}


def _needs_grad(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and not name.split(":")[1].startswith("const_")


def local_of(full: torch.Tensor, local_shape, group) -> torch.Tensor:
    """This rank's part of a global tensor: itself if replicated, else its slab along the dim that differs."""
    if tuple(full.shape) == tuple(local_shape):
        return full
    dim = next(d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b)
    return fxhalo.domain.shard(full, dim, group)


def _upstream(ref: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _step(case: Case, dp, ref_fn, ref_dtype, step: int, seed: int, group) -> list[tuple[str, dict]]:
    """One forward and one backward of the compiled ops and of the reference; ``(label, checks)`` per op."""
    pool = _per_op(case, case.pool(step))
    shard = {key: case.shard.get(key.split(":")[1]) for key in pool}

    def cast(t):
        return t.to(ref_dtype) if t.is_floating_point() else t

    ref_in = {k: cast(t).clone().requires_grad_(_needs_grad(k, t)) for k, t in pool.items()}
    local = {k: (t.clone() if shard[k] is None else fxhalo.domain.shard(t, shard[k], group)) for k, t in pool.items()}
    local = {k: t.requires_grad_(_needs_grad(k, t)) for k, t in local.items()}
    outs, refs = dp(local), ref_fn(ref_in)
    rows = [{"out": close(y.to(r.dtype), local_of(r, y.shape, group))} for y, r in zip(outs, refs)]

    # One backward for all ops: each op's inputs are its own, so their gradients stay apart.
    diff = [i for i, r in enumerate(refs) if r.requires_grad]
    ups = [_upstream(refs[i], seed * 1000 + i) for i in diff]
    keys = [k for k, t in local.items() if t.requires_grad]
    params = [p for m in case.modules() for p in m.parameters()]
    got = torch.autograd.grad(
        [outs[i] for i in diff],
        [local[k] for k in keys] + params,
        [local_of(g, outs[i].shape, group).to(outs[i].dtype) for i, g in zip(diff, ups)],
        allow_unused=True,
    )
    ref_params = [p for m in ref_fn.modules for p in m.parameters()]
    want = torch.autograd.grad([refs[i] for i in diff], [ref_in[k] for k in keys] + ref_params, ups, allow_unused=True)
    for k, g, w in zip(keys, got, want):
        w = _zeros_if_none(w, ref_in[k])
        rows[int(k.split(":")[0])]["grad_" + k.split(":")[1]] = close(
            _zeros_if_none(g, local[k]).to(w.dtype), local_of(w, local[k].shape, group)
        )
    summed = {}
    for j, (g, w, p, rp) in enumerate(zip(got[len(keys) :], want[len(keys) :], params, ref_params)):
        g = _zeros_if_none(g, p)  # grad_sync: every rank holds the full gradient
        summed[f"param {j} {tuple(p.shape)} grad"] = close(g.to(rp.dtype), _zeros_if_none(w, rp))
    labelled = [(op.label, row) for op, row in zip(case.ops, rows)]
    return labelled + ([("parameter gradients", summed)] if summed else [])


class _Reference:
    """The ops on one device, with their own copies of the modules (in the reference dtype)."""

    def __init__(self, case: Case, dtype: torch.dtype):
        self.ops = [
            dataclasses.replace(op, fn=copy.deepcopy(op.fn).to(dtype)) if isinstance(op.fn, nn.Module) else op
            for op in case.ops
        ]
        self.modules = [op.fn for op in self.ops if isinstance(op.fn, nn.Module)]
        self._apply = _apply(self.ops)

    def __call__(self, inputs):
        return self._apply(inputs)

    def train(self, mode: bool):
        for m in self.modules:
            m.train(mode)


def run_case(case: Case, seed: int, group=None) -> dict:
    """Compile the case's ops with domain_parallel, run its steps on this rank and compare with one device."""
    start = time.perf_counter()
    log: dict = {}
    ref = _Reference(case, case.reference_dtype)
    input_shard_dims = {f"inputs['{k}']": case.shard.get(k.split(":")[1]) for k in _per_op(case, case.pool(0))}
    torch._dynamo.reset()  # a fresh graph per case: no recompile limits, no cached graphs
    dp = torch.compile(
        _apply(case.ops),
        backend="domain_parallel",
        options={
            "compiler": recording_compiler(log, sweep_compiler(dist.get_world_size(group))),
            "shard_dim": case.shard_dim,
            "input_shard_dims": input_shard_dims,
            "group": group,
        },
    )
    rows = []
    for step in range(case.steps + case.eval_step):
        if step == case.steps:
            for m in case.modules():
                m.eval()
            ref.train(False)
        rows += _step(case, dp, ref, case.reference_dtype, step, seed * 100 + step, group)
    buffers = {
        f"buffer {name}": close(b.to(rb.dtype), rb)
        for m, rm in zip(case.modules(), ref.modules)
        for (name, b), (_, rb) in zip(m.named_buffers(), rm.named_buffers())
    }
    if buffers:
        rows.append(("running statistics", buffers))
    failed = [f"{label}: {k} err {err:.1e}" for label, row in rows for k, (ok, err) in row.items() if not ok]
    errors: dict = {}
    for label, row in rows:  # the largest error of each op over the steps
        errors[label] = max([errors.get(label, 0.0)] + [err for _, err in row.values()])
    return {
        "case": case.name,
        "ok": not failed,
        "failed": failed,
        "ops": len(case.ops),
        "errors": errors,
        "max_err": max(errors.values(), default=0.0),
        "kernels": log.get("kernels", []),
        "fw": log.get("fw", []),
        "bw": log.get("bw", []),
        "buckets": log.get("buckets", 0),
        "seconds": time.perf_counter() - start,
    }


def _randn(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Affine parameters away from (1, 0), so that their effect and gradients show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


# -- norms -------------------------------------------------------------------------


def _ln_hw(x):
    return F.layer_norm(x, x.shape[-2:])


def _ln_chw(x, w, b):
    return F.layer_norm(x, x.shape[-3:], w, b)


def _ln_chw_plain(x):
    return F.layer_norm(x, x.shape[-3:])


def _rms_hw(x):
    return F.rms_norm(x, x.shape[-2:], eps=1e-6)


def _rms_chw(x, w):
    return F.rms_norm(x, x.shape[-3:], w)


def norms_case(P: int) -> Case:
    """Stateless norms, and the mean-1e3 ones, against the *float64* one-device result.

    At mean 1e3, std 1 the fp32 one-device result is itself ~5e-5 away from the
    exact one (it computes ``x * a + b``); :func:`fp32_one_device_error` measures it.
    """

    def pool(step):
        r = _randn(1)
        return {
            "x": 1.5 * r(2, 6, 4 * P, 5) + 0.5,
            "y": r(2, 3, 4 * P, 5),
            "w": 1 + 0.3 * r(3, 4 * P, 5),
            "b": 0.3 * r(3, 4 * P, 5),
            "big": 1e3 + r(2, 4, 4 * P, 6),
        }

    p = _perturbed
    ops = [
        Op("GroupNorm(1, 6)", p(nn.GroupNorm(1, 6), 1)),
        Op("GroupNorm(2, 6)", p(nn.GroupNorm(2, 6), 2)),
        Op("GroupNorm(3, 6, affine=False)", nn.GroupNorm(3, 6, affine=False)),
        Op("GroupNorm(6, 6): a group per channel", p(nn.GroupNorm(6, 6), 3)),
        Op("InstanceNorm2d(6)", nn.InstanceNorm2d(6)),
        Op("layer_norm over (H, W)", _ln_hw),
        Op("layer_norm over (C, H, W), sharded weight and bias", _ln_chw, ("y", "w", "b")),
        Op("LayerNorm(W): local", p(nn.LayerNorm(5), 4)),
        Op("rms_norm over (H, W)", _rms_hw),
        Op("rms_norm over (C, H, W), sharded weight, default eps", _rms_chw, ("y", "w")),
        Op("RMSNorm(W): local", p(nn.RMSNorm(5), 8)),
        Op("1e3: GroupNorm(2, 4)", p(nn.GroupNorm(2, 4), 5), ("big",)),
        Op("1e3: InstanceNorm2d(4, affine)", p(nn.InstanceNorm2d(4, affine=True), 6), ("big",)),
        Op("1e3: BatchNorm2d(4) training", p(nn.BatchNorm2d(4), 7), ("big",)),
        Op("1e3: layer_norm over (C, H, W)", _ln_chw_plain, ("big",)),
        Op("1e3: var over (H, W)", lambda t: t.var(dim=(2, 3)), ("big",)),
        Op("1e3: std", lambda t: t.std(), ("big",)),
    ]
    return Case(
        "norms, and mean 1e3 / std 1, against float64 one device",
        ops,
        pool,
        {"x": 2, "y": 2, "w": 1, "b": 1, "big": 2},
        reference_dtype=torch.float64,
    )


def fp32_one_device_error(P: int) -> float:
    """How far the fp32 one-device mean-1e3 norms are from the float64 ones (for the record)."""
    case = norms_case(P)
    pool = _per_op(case, case.pool(0))
    big = [i for i, op in enumerate(case.ops) if op.label.startswith("1e3")]
    r32, r64 = _Reference(case, torch.float32), _Reference(case, torch.float64)
    o32 = r32({k: v.float() for k, v in pool.items()})
    o64 = r64({k: v.double() for k, v in pool.items()})
    return max((o32[i].double() - o64[i]).abs().max().item() for i in big)


class _Scaled(nn.Module):
    """``x * 0.5 + 0.1``: two more elementwise ops, with Python scalars."""

    def forward(self, x):
        return x * 0.5 + 0.1


class _TwoUses(nn.Module):
    """GroupNorm -> GELU -> conv, and the norm's output used again after the conv (a residual)."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(2, 6), nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.norm(x)
        return self.conv(F.gelu(y)) + y


class _LayerNormConv(nn.Module):
    """``F.layer_norm`` over (C, H, W) without affine terms -> GELU -> ``conv``."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(F.gelu(F.layer_norm(x, x.shape[-3:])))


def norm_conv_case(P: int) -> Case:
    """GroupNorm (or an InstanceNorm without running statistics, a BatchNorm in training, a layer_norm
    without affine terms) -> elementwise ops -> conv, pool, interpolation or transposed conv: the norm's
    statistics and the halo op's rows in one exchange (fxhalo.passes.fuse), on an uneven row count, for
    convs of every geometry (the BatchNorm's running statistics checked too).

    The dropout one is not fused (a random op stops the search); the others are.
    """
    rows = 4 * P + 1  # uneven: one rank holds an extra row
    torch.manual_seed(P)  # the convs' initial weights: the same on every rank, whatever ran before

    def pool(step):
        r = _randn(50 + step)
        return {"x": 1.5 * r(2, 6, rows, 5) + 0.5, "x1": r(2, 6, rows), "x3": r(1, 4, 3, rows, 3)}

    p = _perturbed
    gn = lambda seed, c=6, g=2: p(nn.GroupNorm(g, c), seed)  # noqa: E731
    ops = [
        Op("GroupNorm -> GELU -> conv 3x3", nn.Sequential(gn(30), nn.GELU(), p(nn.Conv2d(6, 4, 3, padding=1), 31))),
        Op(
            "GroupNorm -> SiLU -> *0.5+0.1 -> conv k3 s2",
            nn.Sequential(gn(32), nn.SiLU(), _Scaled(), p(nn.Conv2d(6, 4, 3, stride=2, padding=1), 33)),
        ),
        Op(
            "GroupNorm -> ReLU -> conv k5 dilation 2",
            nn.Sequential(gn(34, g=3), nn.ReLU(), p(nn.Conv2d(6, 4, 5, padding=4, dilation=2), 35)),
        ),
        Op("GroupNorm -> conv (4, 3) 'same'", nn.Sequential(gn(36), p(nn.Conv2d(6, 4, (4, 3), padding="same"), 37))),
        Op("GroupNorm -> conv, output used twice", p(_TwoUses(), 38)),
        Op("GroupNorm -> GELU -> conv1d k3", nn.Sequential(gn(39), nn.GELU(), p(nn.Conv1d(6, 4, 3, padding=1), 40))),
        Op(
            "GroupNorm -> GELU -> conv3d k3",
            nn.Sequential(gn(41, c=4), nn.GELU(), p(nn.Conv3d(4, 2, 3, padding=1), 42)),
            ("x3",),
        ),
        Op(
            "InstanceNorm (affine) -> GELU -> conv 3x3",
            nn.Sequential(p(nn.InstanceNorm2d(6, affine=True), 45), nn.GELU(), p(nn.Conv2d(6, 4, 3, padding=1), 46)),
        ),
        Op(
            "BatchNorm (training) -> ReLU -> conv 3x3",
            nn.Sequential(p(nn.BatchNorm2d(6), 47), nn.ReLU(), p(nn.Conv2d(6, 4, 3, padding=1), 48)),
        ),
        Op(
            "GroupNorm -> Dropout(0) -> conv (not fused)",
            nn.Sequential(gn(43), nn.Dropout(0.0), p(nn.Conv2d(6, 4, 3, padding=1), 44)),
        ),
        # Any halo op takes the rows, whatever its geometry and fill (fxhalo.halo.planned_exchange); a max pool
        # not under a callable inner compiler, such as this sweep's recording one, which may end in Inductor
        # (fxhalo.backend.fuses_max_pools): this norm keeps its own sum.
        Op(
            "GroupNorm -> GELU -> max_pool k3 s2 p1 (not fused)",
            nn.Sequential(gn(49), nn.GELU(), nn.MaxPool2d(3, 2, 1)),
        ),
        Op(
            "GroupNorm -> avg_pool k3 s1 p1, count_include_pad=False",
            nn.Sequential(gn(50), nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
        ),
        Op(
            "InstanceNorm (affine) -> SiLU -> bilinear x2",
            nn.Sequential(
                p(nn.InstanceNorm2d(6, affine=True), 51), nn.SiLU(), nn.Upsample(scale_factor=2.0, mode="bilinear")
            ),
        ),
        Op(
            "BatchNorm (training) -> ReLU -> conv_transpose k4 s2 p1",
            nn.Sequential(p(nn.BatchNorm2d(6), 52), nn.ReLU(), p(nn.ConvTranspose2d(6, 4, 4, 2, 1), 53)),
        ),
        Op("layer_norm over (C, H, W) -> GELU -> conv 3x3", _LayerNormConv(p(nn.Conv2d(6, 4, 3, padding=1), 54))),
        Op(
            "GroupNorm -> GELU -> conv 3x3, padding_mode='reflect' (a folded pad)",
            nn.Sequential(gn(55), nn.GELU(), p(nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), 56)),
        ),
    ]
    ops[5].inputs = ("x1",)
    return Case("GroupNorm then a halo op: one exchange", ops, pool, {"x": 2, "x1": 2, "x3": 3}, steps=2)


def running_stats_case(P: int) -> Case:
    """Instance and batch norm with running statistics: 3 training steps, then one in eval mode."""

    def pool(step):
        r = _randn(10 + step)
        return {
            "a": r(2, 3, 4 * P),
            "c": r(1, 2, 2 * P, 3, 4) + 1,
            "ba": r(4, 3, 2 * P),
            "bb": 2 * r(2, 4, 2 * P, 3) - 1,
            "bc": r(2, 2, 2 * P, 2, 2),
        }

    p = _perturbed
    ops = [
        Op(
            "InstanceNorm1d(3, affine, running stats)",
            p(nn.InstanceNorm1d(3, affine=True, track_running_stats=True), 8),
            ("a",),
        ),
        Op(
            "InstanceNorm3d(2, affine, running stats)",
            p(nn.InstanceNorm3d(2, affine=True, track_running_stats=True), 9),
            ("c",),
        ),
        Op("BatchNorm1d(3)", p(nn.BatchNorm1d(3), 10), ("ba",)),
        Op("BatchNorm2d(4)", p(nn.BatchNorm2d(4), 11), ("bb",)),
        Op("BatchNorm3d(2, affine=False, momentum=0.3)", nn.BatchNorm3d(2, affine=False, momentum=0.3), ("bc",)),
    ]
    return Case(
        "instance and batch norm: 3 training steps with running stats, then eval",
        ops,
        pool,
        {k: 2 for k in ("a", "c", "ba", "bb", "bc")},
        steps=3,
        eval_step=True,
    )


# -- reductions, pools, softmax, losses --------------------------------------------


def _reduction_ops() -> list[Op]:
    return [
        Op("x.sum()", lambda x: x.sum()),
        Op("x.sum((2, 3), keepdim=True)", lambda x: x.sum((2, 3), keepdim=True)),
        Op("torch.sum(x, dim=3): local", lambda x: torch.sum(x, dim=3)),
        Op("x.mean(dim=(1, 2))", lambda x: x.mean(dim=(1, 2))),
        Op("torch.mean(x, -2, keepdim=True)", lambda x: torch.mean(x, -2, keepdim=True)),
        Op("ties.amax((1, 2)): ties across ranks", lambda t: t.amax((1, 2)), ("ties",)),
        Op("ties.amin()", lambda t: t.amin(), ("ties",)),
        Op("x.max()", lambda x: x.max()),
        Op("torch.max(x, 0.5 * x): elementwise", lambda x: torch.max(x, 0.5 * x)),
        Op("x.max(dim=3)[0]: local", lambda x: x.max(dim=3)[0]),
        Op("x.var(2)", lambda x: x.var(2)),
        Op(
            "torch.var(x, (2, 3), correction=0, keepdim=True)",
            lambda x: torch.var(x, (2, 3), correction=0, keepdim=True),
        ),
        Op("x.std()", lambda x: x.std()),
        Op("torch.std(x, 2, unbiased=False)", lambda x: torch.std(x, 2, unbiased=False)),
        Op("F.adaptive_avg_pool2d(x, 1)", lambda x: F.adaptive_avg_pool2d(x, 1)),
        Op("F.adaptive_max_pool2d(ties, (1, 2))", lambda t: F.adaptive_max_pool2d(t, (1, 2)), ("ties",)),
        Op("nn.AdaptiveAvgPool2d((1, None))", nn.AdaptiveAvgPool2d((1, None))),
        Op("F.adaptive_avg_pool1d(x1, 1)", lambda t: F.adaptive_avg_pool1d(t, 1), ("x1",)),
        Op("F.adaptive_max_pool3d(x3, (1, 2, 1))", lambda t: F.adaptive_max_pool3d(t, (1, 2, 1)), ("x3",)),
    ]


def _softmax_ops() -> list[Op]:
    return [
        Op("F.softmax(x, 2)", lambda x: F.softmax(x, 2)),
        Op("F.log_softmax(x, dim=2)", lambda x: F.log_softmax(x, dim=2)),
        Op("torch.softmax(x, 2, dtype=torch.float64)", lambda x: torch.softmax(x, 2, dtype=torch.float64)),
        Op("F.softmax(x, 3): local", lambda x: F.softmax(x, 3)),
        Op("F.softmax(masked, 2): rank 0 rows of a column all -inf", lambda t: F.softmax(t, 2), ("masked",)),
    ]


def _loss_ops() -> list[Op]:
    pt = ("pred", "target")
    ce = ("logits", "const_classes")
    return [
        Op("mse_loss", lambda p, t: F.mse_loss(p, t), pt),
        Op("mse_loss sum", lambda p, t: F.mse_loss(p, t, reduction="sum"), pt),
        Op("l1_loss", lambda p, t: F.l1_loss(p, t), pt),
        Op("l1_loss sum", lambda p, t: F.l1_loss(p, t, reduction="sum"), pt),
        Op("smooth_l1_loss", lambda p, t: F.smooth_l1_loss(p, t), pt),
        Op("smooth_l1_loss(beta=0.5) sum", lambda p, t: F.smooth_l1_loss(p, t, beta=0.5, reduction="sum"), pt),
        Op("huber_loss(delta=0.7)", lambda p, t: F.huber_loss(p, t, delta=0.7), pt),
        Op("mse_loss(weight=w)", lambda p, t, w: F.mse_loss(p, t, weight=w), pt + ("w",)),
        Op(
            "(lat * (pred - target)**2).mean(): per-row weight",
            lambda p, t, w: (w * (p - t) ** 2).mean(),
            pt + ("lat",),
        ),
        Op("mse_loss none: local", lambda p, t: F.mse_loss(p, t, reduction="none"), pt),
        Op("cross_entropy, ignored pixels", lambda z, c: F.cross_entropy(z, c), ce),
        Op(
            "cross_entropy sum, weight, ignore_index=2, smoothing",
            lambda z, c, w: F.cross_entropy(
                z, c.clamp(min=0), weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum"
            ),
            ce + ("const_cw",),
        ),
        Op(
            "cross_entropy, probabilities, smoothing",
            lambda z, p: F.cross_entropy(z, p, label_smoothing=0.2),
            ("logits", "const_probs"),
        ),
        Op(
            "nll_loss(log_softmax, weight)",
            lambda z, c, w: F.nll_loss(F.log_softmax(z, 1), c, weight=w),
            ce + ("const_cw",),
        ),
    ]


def reductions_case(P: int) -> Case:
    def pool(step):
        r = _randn(50)
        masked = r(2, 3, 4 * P, 5)
        masked[:, :, :4, 1] = -float("inf")
        classes = torch.randint(0, 4, (2, 4 * P, 5), generator=torch.Generator().manual_seed(52))
        classes[0, 1, :2] = -100  # ignored pixels
        return {
            "x": r(2, 3, 4 * P, 5),
            "x1": r(2, 3, 4 * P),
            "x3": r(1, 2, 2 * P, 3, 2),
            "masked": masked,
            "ties": torch.randint(0, 3, (2, 3, 4 * P, 5), generator=torch.Generator().manual_seed(51)).float(),
            "pred": r(2, 3, 4 * P, 5),
            "target": r(2, 3, 4 * P, 5),
            "w": r(2, 3, 4 * P, 5).abs() + 0.1,
            "lat": torch.cos(torch.linspace(-1.2, 1.2, 4 * P)).view(1, 1, 4 * P, 1),  # a per-row weight
            "logits": r(2, 4, 4 * P, 5),
            "const_classes": classes,
            "const_probs": torch.softmax(r(2, 4, 4 * P, 5), 1),
            "const_cw": r(4).abs() + 0.5,
        }

    shard = {k: 2 for k in ("x", "x1", "x3", "masked", "ties", "pred", "target", "w", "lat", "logits", "const_probs")}
    shard["const_classes"] = 1  # class-index targets [N, H, W]: H is dim 1
    return Case(
        "reductions, adaptive pools, softmax and losses over H",
        _reduction_ops() + _softmax_ops() + _loss_ops(),
        pool,
        shard,
    )


def along_w_case(P: int) -> Case:
    """Sharded along W (dim 3): max pooling's first-maximum rule then depends on positions, not rank order."""

    def pool(step):
        r = _randn(60)
        ties = torch.randint(0, 2, (2, 2, 3, 2 * P), generator=torch.Generator().manual_seed(61)).float()
        return {"x": r(2, 2, 3, 2 * P), "ties": ties}

    ops = [
        Op("F.adaptive_max_pool2d(ties, 1)", lambda t: F.adaptive_max_pool2d(t, 1), ("ties",)),
        Op("ties.amax((2, 3))", lambda t: t.amax((2, 3)), ("ties",)),
        Op("x.mean(-1)", lambda x: x.mean(-1)),
        Op("F.softmax(x, -1)", lambda x: F.softmax(x, -1)),
        Op("x.var(-1)", lambda x: x.var(-1)),
    ]
    return Case("max pool, amax, mean, softmax, var over W", ops, pool, {"x": 3, "ties": 3}, shard_dim=3)


# -- the spawned group -------------------------------------------------------------

WORLD_SIZES = (2, 3, 4)


def sum_collectives(P: int, group) -> list[dict]:
    """``fxhalo.ops.collectives.all_reduce_sum`` called directly, eagerly, on a small and a large tensor.

    Each rank sums ``rank + 1`` times a common tensor and backpropagates ``rank + 1``
    times a common gradient, so the exact sum and the full gradient are known.  The
    result is returned whole: the ranks compare it bit for bit.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from fxhalo.domain import resolve_group
    from fxhalo.ops.collectives import EXCHANGE_SUM_MAX_BYTES, all_reduce_sum

    rank = dist.get_rank(group) if group is not None else dist.get_rank()
    name = resolve_group(group).group_name
    out = []
    for numel in (7, EXCHANGE_SUM_MAX_BYTES // 4 + 1):  # fp32: just under, and just over the limit
        base = _randn(70 + numel % 3)(numel)
        x = ((rank + 1) * base).requires_grad_()
        seen = []

        class Spy(TorchDispatchMode):  # used within this iteration only
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "_c10d_functional" and "wait" not in func.name():
                    seen.append(func.name().split("::")[1].split(".")[0])  # noqa: B023
                return func(*args, **(kwargs or {}))

        with Spy():
            y = all_reduce_sum(x, name)
            y.backward(base * (rank + 1))
        total = P * (P + 1) // 2
        out.append(
            {
                "numel": numel,
                "collectives": seen,
                "sum": y.detach(),
                "sum_ok": torch.allclose(y, total * base, rtol=1e-5, atol=1e-6),
                "grad_ok": torch.allclose(x.grad, total * base, rtol=1e-5, atol=1e-6),
            }
        )
    return out


def eager_rms_norm(P: int, group) -> dict:
    """``fxhalo.nn.DomainParallelLayerNorm`` around ``nn.RMSNorm([C, H, W])`` (global shape), eagerly:
    forward, input gradient and the weight gradient summed over the ranks, against one device."""
    torch.manual_seed(P)
    plain = _perturbed(nn.RMSNorm([3, 4 * P + 1, 5]), 9)  # uneven rows
    wrapped = fxhalo.nn.DomainParallelLayerNorm(copy.deepcopy(plain), shard_dim=2, group=group)
    x = _randn(11)(2, 3, 4 * P + 1, 5).requires_grad_()
    gy = _randn(12)(2, 3, 4 * P + 1, 5)
    ref = plain(x)
    ref.backward(gy)
    x_local = fxhalo.domain.shard(x.detach(), 2, group).requires_grad_()
    y_local = wrapped(x_local)
    y_local.backward(fxhalo.domain.shard(gy, 2, group))
    fxhalo.nn.reduce_gradients(wrapped, group)
    checks = {
        "out": torch.allclose(y_local, fxhalo.domain.shard(ref.detach(), 2, group), atol=1e-5, rtol=1e-4),
        "grad_in": torch.allclose(x_local.grad, fxhalo.domain.shard(x.grad, 2, group), atol=1e-5, rtol=1e-4),
        "grad weight": (wrapped.weight.grad - plain.weight.grad).abs().max().item()
        <= 1e-5 + 1e-4 * plain.weight.grad.abs().max().item(),
    }
    return {"ok": all(checks.values()), "failed": [k for k, v in checks.items() if not v]}


def run_world(P: int, group) -> dict:
    start = time.perf_counter()
    norms = [run_case(norms_case(P), 1, group), run_case(running_stats_case(P), 2, group)]
    reductions = [run_case(reductions_case(P), 3, group), run_case(along_w_case(P), 4, group)]
    return {
        "norms": norms,
        "reductions": reductions,
        "fp32_one_device_err": fp32_one_device_error(P),
        "sums": sum_collectives(P, group),
        "fused": run_case(norm_conv_case(P), 5, group),
        "eager_rms_norm": eager_rms_norm(P, group),
        "seconds": time.perf_counter() - start,
    }


def run_all(rank: int, world_size: int) -> dict:
    """Every case on groups of the first 2, 3, ... ``world_size`` ranks, one size after the other."""
    out = {}
    for P in WORLD_SIZES:
        group = dist.new_group(list(range(P))) if P < world_size else None  # every rank joins new_group
        if rank < P:
            out[P] = run_world(P, group)
        dist.barrier()  # the ranks outside the group wait here
    return out


_SPAWNED: dict = {}


def _spawn() -> list[dict]:
    """The one spawn, run at most once per session: a failure is kept too, so that the
    other tests report it instead of spawning again."""
    if not _SPAWNED:
        try:
            _SPAWNED["result"] = run_ranks(run_all, max(WORLD_SIZES), timeout=400)
        except BaseException as e:  # noqa: BLE001 - re-raised by every caller
            _SPAWNED["error"] = e
    if "error" in _SPAWNED:
        raise _SPAWNED["error"]
    return _SPAWNED["result"]


def results(world_size: int) -> list[dict]:
    """The results of the ranks of the ``world_size`` group, from the one spawn (cached for the session)."""
    return [per_rank[world_size] for per_rank in _spawn()[:world_size]]


def failures(per_rank: list[dict], family: str) -> list:
    return [(r, c["case"], c["failed"][:6]) for r, res in enumerate(per_rank) for c in res[family] if not c["ok"]]


# -- the table in docs/coverage.md ---------------------------------------------------


def _collectives_per_op(rank: int, world_size: int) -> list[tuple[str, str, str, str]]:
    """Compile every op of every case on its own; ``(op, kernel, forward, backward)`` collectives."""
    rows = []
    for make in (norms_case, running_stats_case, reductions_case, along_w_case):
        case = make(world_size)
        for i, op in enumerate(case.ops):
            single = dataclasses.replace(case, name=op.label, ops=[op], steps=1, eval_step=False)
            r = run_case(single, 90 + i)
            rows.append(
                (op.label, ", ".join(r["kernels"]) or "(local)", ", ".join(r["fw"]) or "-", ", ".join(r["bw"]) or "-")
            )
    return rows


if __name__ == "__main__":  # python -m tests.distributed.reduce_cases
    from tabulate import tabulate

    print(
        tabulate(
            run_ranks(_collectives_per_op, 2, timeout=900)[0],
            headers=["op", "fxhalo kernel", "forward collectives", "backward collectives"],
            tablefmt="github",
        )
    )
