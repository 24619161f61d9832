"""The eager layers (``fxhalo.nn``, ``convert_to_domain_parallel``, the depthwise convs) against one device.

One spawn of 3 gloo ranks runs every case on a 2-rank sub-group (passed as a
ProcessGroup) and on WORLD (3 ranks, passed as ``None``): the partitions differ,
and so do the edge ranks.  Each case builds the plain module on every rank from
the same seed, computes the one-device reference on the global tensor, converts
the module and runs it on this rank's slab.  A row's checks point at:

- ``out``: the forward slab (halo widths, edge rules, global coordinates);
- ``grad_in``: the input-gradient slab (a halo gradient that misses its owner, or
  the cross-rank terms of a norm's backward);
- ``grad <param>``: the partial parameter gradients summed over the ranks (by
  ``fxhalo.nn.reduce_gradients``);
- ``buffer <name>``: running statistics (must use the *global* count);
- ``type``: that convert put the expected layer in (a case must not pass by
  staying local).

The seven ``credit:`` cases are the layer configurations that docs/eager.md names in
"What differs from CREDIT, and why".
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.harness import close, run_ranks

WORLD = 3
ROOT = pathlib.Path(__file__).resolve().parents[2]


class PeriodicConv2d(nn.Module):
    """A conv on a global lat-lon grid: circular pad along W, reflect along H, then an unpadded conv."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.padding = k // 2
        self.conv = nn.Conv2d(cin, cout, k, padding=0)

    def forward(self, x):
        p = self.padding
        return self.conv(F.pad(F.pad(x, (p, p, 0, 0), mode="circular"), (0, 0, p, p), mode="reflect"))


class TransposedToSize(nn.Module):
    """A transposed conv asked for a global ``output_size`` (which picks its output padding)."""

    def __init__(self, size):
        super().__init__()
        self.size = size
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=self.size)


def _convert(module, group, shard_dim):
    import fxhalo
    from fxhalo.nn import DomainParallelPeriodicConv2d

    return fxhalo.convert_to_domain_parallel(
        module,
        group=group,
        shard_dim=shard_dim,
        custom_converters={PeriodicConv2d: lambda m: DomainParallelPeriodicConv2d(m, shard_dim, group)},
    )


def _interpolate_with_global_size(module, group, shard_dim):
    from fxhalo.nn import DomainParallelInterpolate

    return DomainParallelInterpolate(
        size=module.size, mode=module.mode, align_corners=module.align_corners, shard_dim=shard_dim, group=group
    )


@dataclasses.dataclass
class Case:
    label: str
    build: Callable[[int], nn.Module]  # P -> the plain module
    shape: Callable[[int], tuple]  # P -> the global input shape
    expect: str  # class name convert must produce at the root (or of the first child of a Sequential)
    shard_dim: int = -2
    steps: int = 1  # training steps (running statistics advance each step)
    eval_step: bool = False
    wrap: Callable = _convert


def _bchw(c=3, w=6):
    return lambda p: (2, c, 8 * p, w)


def cases() -> list[Case]:
    from fxhalo.depthwise import DistributedDepthwiseConv1d, DistributedDepthwiseConv2d

    c2 = "DomainParallelConv2d"
    t2 = "DomainParallelConvTranspose2d"
    return [
        Case("conv k3 p1", lambda p: nn.Conv2d(3, 4, 3, padding=1), _bchw(), c2),
        Case("credit: conv k3 s2 p1 downsample", lambda p: nn.Conv2d(3, 4, 3, stride=2, padding=1), _bchw(), c2),
        Case("credit: conv even k2 s1 'same'", lambda p: nn.Conv2d(3, 4, 2, padding="same"), _bchw(), c2),
        Case("conv k4 'same' (1 above, 2 below)", lambda p: nn.Conv2d(3, 4, 4, padding="same"), _bchw(), c2),
        Case("credit: conv dilation 2", lambda p: nn.Conv2d(3, 4, 3, padding=2, dilation=2), _bchw(), c2),
        # kernel P+1 with no padding: the global output loses P rows, so it still splits evenly
        Case("credit: conv padding 0", lambda p: nn.Conv2d(3, 4, (p + 1, 3), padding=0), _bchw(), c2),
        Case("conv k2 s2 patchify", lambda p: nn.Conv2d(3, 4, 2, stride=2), _bchw(), c2),
        Case(
            "conv k5x3 reflect", lambda p: nn.Conv2d(3, 4, (5, 3), padding=(2, 1), padding_mode="reflect"), _bchw(), c2
        ),
        Case("conv k3 circular", lambda p: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), _bchw(), c2),
        Case(
            "conv k3 replicate groups 3 no bias",
            lambda p: nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False, padding_mode="replicate"),
            _bchw(),
            c2,
        ),
        Case("conv 1x1 stays local", lambda p: nn.Conv2d(3, 4, 1), _bchw(), "Conv2d"),
        Case(
            "conv1d k5 circular",
            lambda p: nn.Conv1d(3, 4, 5, padding=2, padding_mode="circular"),
            lambda p: (2, 3, 8 * p),
            "DomainParallelConv1d",
            shard_dim=-1,
        ),
        Case(
            "conv3d k3 (H of B,C,T,H,W)",
            lambda p: nn.Conv3d(2, 3, 3, padding=1),
            lambda p: (1, 2, 3, 4 * p, 4),
            "DomainParallelConv3d",
            shard_dim=3,
        ),
        Case("credit: conv transpose k3 s2 p1 op1", lambda p: nn.ConvTranspose2d(3, 4, 3, 2, 1, 1), _bchw(), t2),
        Case("conv transpose k4 s2 p1", lambda p: nn.ConvTranspose2d(3, 4, 4, 2, 1), _bchw(), t2),
        Case("conv transpose k2 s2", lambda p: nn.ConvTranspose2d(3, 4, 2, 2), _bchw(), t2),
        Case(
            "conv transpose to a global output_size",
            lambda p: TransposedToSize((16 * p, 12)),
            _bchw(),
            "TransposedToSize",
        ),
        Case(
            "conv transpose 1d k3 s2 p1 op1",
            lambda p: nn.ConvTranspose1d(3, 2, 3, 2, 1, 1),
            lambda p: (2, 3, 4 * p),
            "DomainParallelConvTranspose1d",
            shard_dim=-1,
        ),
        Case(
            "conv transpose 3d k3 s2 p1 op1",
            lambda p: nn.ConvTranspose3d(2, 2, 3, 2, 1, 1),
            lambda p: (1, 2, 2, 2 * p, 3),
            "DomainParallelConvTranspose3d",
            shard_dim=3,
        ),
        Case("group norm", lambda p: nn.GroupNorm(2, 4), _bchw(4), "DomainParallelGroupNorm"),
        Case(
            "credit: instance norm 2d affine, running stats",
            lambda p: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
            _bchw(),
            "DomainParallelInstanceNorm",
            steps=2,
            eval_step=True,
        ),
        Case(
            "instance norm 1d",
            lambda p: nn.InstanceNorm1d(3),
            lambda p: (2, 3, 8 * p),
            "DomainParallelInstanceNorm",
            shard_dim=-1,
        ),
        Case("batch norm 2d", lambda p: nn.BatchNorm2d(3), _bchw(), "DomainParallelBatchNorm", steps=2, eval_step=True),
        Case(
            "batch norm 2d momentum None",
            lambda p: nn.BatchNorm2d(3, momentum=None),
            _bchw(),
            "DomainParallelBatchNorm",
            steps=2,
        ),
        Case(
            "periodic conv k3 (H sharded)", lambda p: PeriodicConv2d(3, 4, 3), _bchw(), "DomainParallelPeriodicConv2d"
        ),
        Case(
            "periodic conv k5 (H sharded)",
            lambda p: PeriodicConv2d(3, 4, 5),
            _bchw(w=8),
            "DomainParallelPeriodicConv2d",
        ),
        Case(
            "periodic conv k3 (W sharded: wraps the ring)",
            lambda p: PeriodicConv2d(3, 4, 3),
            lambda p: (2, 3, 5, 8 * p),
            "DomainParallelPeriodicConv2d",
            shard_dim=-1,
        ),
        Case(
            "credit: bilinear x2 (global edges clamp)",
            lambda p: nn.Upsample(scale_factor=2, mode="bilinear"),
            _bchw(),
            "DomainParallelInterpolate",
        ),
        Case(
            "bilinear x2 align_corners",
            lambda p: nn.UpsamplingBilinear2d(scale_factor=2),
            _bchw(),
            "DomainParallelInterpolate",
        ),
        Case(
            "bilinear global size (12P, 9)",
            lambda p: nn.Upsample(size=(12 * p, 9), mode="bilinear", align_corners=False),
            _bchw(),
            "DomainParallelInterpolate",
            wrap=_interpolate_with_global_size,
        ),
        Case(
            "bilinear x0.5",
            lambda p: nn.Upsample(scale_factor=0.5, mode="bilinear"),
            _bchw(),
            "DomainParallelInterpolate",
        ),
        Case("bicubic x2", lambda p: nn.Upsample(scale_factor=2, mode="bicubic"), _bchw(), "DomainParallelInterpolate"),
        Case("nearest x2", lambda p: nn.Upsample(scale_factor=2), _bchw(), "DomainParallelInterpolate"),
        Case("max pool k3 s2 p1", lambda p: nn.MaxPool2d(3, 2, 1), _bchw(), "DomainParallelPool"),
        Case(
            "avg pool k3 s1 p1 no pad count",
            lambda p: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
            _bchw(),
            "DomainParallelPool",
        ),
        Case("adaptive avg pool (4P, 3)", lambda p: nn.AdaptiveAvgPool2d((4 * p, 3)), _bchw(), "DomainParallelPool"),
        Case("softmax along the shard", lambda p: nn.Softmax(dim=-2), _bchw(), "DomainParallelSoftmax"),
        Case(
            "log softmax along the shard (3-D input, dim 1)",
            lambda p: nn.LogSoftmax(dim=1),
            lambda p: (2, 4 * p + 1, 3),  # uneven shards
            "DomainParallelSoftmax",
            shard_dim=1,
        ),
        Case(
            "depthwise 1d causal k4, length sharded",
            lambda p: DistributedDepthwiseConv1d(6, 4, causal=True, num_groups=3, bias=True),
            lambda p: (2, 6, 4 * p),
            "DistributedDepthwiseConv1d",
            shard_dim=-1,
        ),
        Case(
            "depthwise 2d k(3, 2), H sharded",
            lambda p: DistributedDepthwiseConv2d(4, (3, 2), num_groups=2),
            _bchw(4),
            "DistributedDepthwiseConv2d",
        ),
        Case(
            "small conv net",
            lambda p: nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.GroupNorm(2, 8),
                nn.GELU(),
                nn.Conv2d(8, 8, 3, stride=2, padding=1),
                nn.InstanceNorm2d(8, affine=True),
                nn.SiLU(),
                nn.Upsample(scale_factor=2, mode="bilinear"),
                nn.Conv2d(8, 8, 1),
                nn.ConvTranspose2d(8, 4, 3, 2, 1, 1),
                nn.MaxPool2d(2),
            ),
            _bchw(),
            c2,
        ),
    ]


def _named(module, kind):
    return dict(module.named_parameters() if kind == "param" else module.named_buffers())


def run_case(case: Case, p: int, group, seed: int) -> dict:
    """Checks of one case on this rank: ``{check: (ok, max_err)}``."""
    import fxhalo

    torch.manual_seed(seed)  # every rank builds the same module and draws the same tensors
    plain = case.build(p)
    ref_model = copy.deepcopy(plain)
    model = case.wrap(plain, group, case.shard_dim)
    root = model[0] if isinstance(model, nn.Sequential) else model
    checks = {"type": (type(root).__name__ == case.expect, 0.0)}
    for step in range(case.steps + case.eval_step):
        if step == case.steps:
            model.eval()
            ref_model.eval()
        x = torch.randn(case.shape(p))
        ref_in = x.clone().requires_grad_()
        ref = ref_model(ref_in)
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
        x_local = fxhalo.domain.shard(x, case.shard_dim, group).requires_grad_()
        y = model(x_local)
        y.backward(fxhalo.domain.shard(grad_out, case.shard_dim, group))
        tag = f"step {step} " if case.steps + case.eval_step > 1 else ""
        checks[tag + "out"] = close(y, fxhalo.domain.shard(ref.detach(), case.shard_dim, group))
        checks[tag + "grad_in"] = close(x_local.grad, fxhalo.domain.shard(ref_in.grad, case.shard_dim, group))
        fxhalo.nn.reduce_gradients(model, group)  # each rank held a partial gradient
        mine = _named(model, "param")
        for name, want in _named(ref_model, "param").items():
            checks[f"{tag}grad {name}"] = close(mine[name].grad, want.grad)
        mine = _named(model, "buffer")
        for name, want in _named(ref_model, "buffer").items():
            checks[f"{tag}buffer {name}"] = close(mine[name].double(), want.double())
        model.zero_grad()
        ref_model.zero_grad()
    return checks


def _global_pools(p: int, group) -> dict:
    """Adaptive pools to one row along the shard: the output is replicated, and so is the gradient given to it."""
    import fxhalo

    out = {}
    for label, build, shape in (
        ("avg 2d (1, 3)", lambda: nn.AdaptiveAvgPool2d((1, 3)), (2, 3, 4 * p + 1, 6)),
        ("max 2d 1", lambda: nn.AdaptiveMaxPool2d(1), (2, 3, 4 * p, 5)),
        ("avg 1d 1 (length sharded)", lambda: nn.AdaptiveAvgPool1d(1), (2, 3, 3 * p)),
    ):
        torch.manual_seed(p)
        shard_dim = -1 if "1d" in label else -2
        model = fxhalo.convert_to_domain_parallel(nn.Sequential(build()), group=group, shard_dim=shard_dim)
        x = torch.randn(shape)
        ref_in = x.clone().requires_grad_()
        ref = build()(ref_in)  # no parameters: a fresh module is the reference
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
        x_local = fxhalo.domain.shard(x, shard_dim, group).requires_grad_()
        y = model(x_local)
        y.backward(grad_out)  # the full gradient on every rank, as for a replicated value
        out[label + " type"] = (type(model[0]).__name__ == "DomainParallelPool", 0.0)
        out[label + " out"] = close(y, ref.detach())
        out[label + " grad_in"] = close(x_local.grad, fxhalo.domain.shard(ref_in.grad, shard_dim, group))
    return out


def _cp_slicing(rank: int, cp_group) -> dict:
    """Each rank of a 2-rank context-parallel group convolves its block of channels."""
    import torch.distributed as dist

    import fxhalo

    out = {}
    for label, make, shape in (
        (
            "1d causal",
            lambda: fxhalo.DistributedDepthwiseConv1d(8, 3, causal=True, num_groups=2, bias=True),
            (2, 8, 10),
        ),
        ("2d", lambda: fxhalo.DistributedDepthwiseConv2d(8, 3, num_groups=4, bias=True), (2, 8, 5, 6)),
    ):
        torch.manual_seed(1)
        m = make()
        x = torch.randn(shape)
        full = m(x)
        full.sum().backward()
        want_grad = m.weight.grad.clone()
        m.zero_grad()
        block = x[:, 4 * rank : 4 * (rank + 1)]
        y = m(block, cp_group=cp_group)
        y.sum().backward()
        got_grad = m.weight.grad.clone()
        dist.all_reduce(got_grad, group=cp_group)  # each rank's gradient covers its block's filters
        out[label + " out"] = close(y, full[:, 4 * rank : 4 * (rank + 1)].detach())[0]
        out[label + " weight grad"] = close(got_grad, want_grad)[0]
        try:
            m(x, cp_group=cp_group)  # all 8 channels where 4 are expected
            out[label + " mismatch raises"] = False
        except RuntimeError as e:
            out[label + " mismatch raises"] = "expected 4" in str(e)
    try:
        fxhalo.DistributedDepthwiseConv1d(3, 3)(torch.randn(1, 1, 4), cp_group=cp_group)
        out["C % P raises"] = False
    except RuntimeError as e:
        out["C % P raises"] = "does not split" in str(e)
    return out


def _run(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    import fxhalo
    from fxhalo.nn import DomainParallelConv2d

    pair = dist.new_group([0, 1])  # every rank must take part in creating each group
    solo = dist.new_group([0])
    results = {}
    for p, group in ((2, pair), (world_size, None)):
        if rank >= p:
            continue
        results[p] = {case.label: run_case(case, p, group, seed=i) for i, case in enumerate(cases())}
        results[f"global pools {p}"] = _global_pools(p, group)

    # A group of one rank runs the plain op: bit-for-bit the wrapped module's result.
    if rank == 0:
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 3, 3, padding=1)
        x = torch.randn(1, 2, 6, 5)
        results["solo group equals the plain conv"] = torch.equal(DomainParallelConv2d(conv, group=solo)(x), conv(x))

    # A sharded channel dim is refused before any collective, on every rank.
    try:
        DomainParallelConv2d(nn.Conv2d(2, 3, 3), shard_dim=1)(torch.randn(1, 2, 6, 5))
        results["channel shard refused"] = False
    except fxhalo.FxHaloError as e:
        results["channel shard refused"] = "channel dim" in str(e)

    if rank < 2:
        results["cp"] = _cp_slicing(rank, pair)

    # docs/eager.md's example, on every rank of WORLD (its main uses the default group).
    namespace: dict = {"__name__": "docs_eager"}  # not "__main__": its own launcher stays off
    exec(compile(_docs_example(), "docs/eager.md", "exec"), namespace)
    results["docs example"] = namespace["main"](rank, world_size)
    return results


def _docs_example() -> str:
    """The one python block of docs/eager.md."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "eager.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/eager.md should hold exactly one python block (the runnable example)"
    return blocks[0]


@functools.cache
def results() -> tuple:
    return tuple(run_ranks(_run, WORLD, timeout=240))


def _failures(p: int) -> list:
    bad = []
    for rank, per_rank in enumerate(results()):
        for label, checks in per_rank.get(p, {}).items():
            failed = {name: err for name, (ok, err) in checks.items() if not ok}
            if failed:
                bad.append((rank, label, failed))
    return bad


@pytest.mark.timeout(300)
@pytest.mark.parametrize("p", [2, WORLD])
def test_every_wrapper_matches_one_device(p):
    per_rank = results()
    assert len(per_rank[0][p]) == len(cases())
    assert not _failures(p), _failures(p)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("p", [2, WORLD])
def test_global_pools_match_one_device(p):
    for rank, per_rank in enumerate(results()[:p]):
        checks = per_rank[f"global pools {p}"]
        assert len(checks) == 9 and all(ok for ok, _ in checks.values()), (rank, checks)


@pytest.mark.timeout(300)
def test_credit_failures_are_covered():
    labels = [label for label in results()[0][2] if label.startswith("credit:")]
    assert len(labels) == 7, labels  # the 7 layer configurations CREDIT gets wrong


@pytest.mark.timeout(300)
def test_solo_group_and_channel_refusal():
    per_rank = results()
    assert per_rank[0]["solo group equals the plain conv"]
    assert all(r["channel shard refused"] for r in per_rank)


@pytest.mark.timeout(300)
def test_docs_example_matches_one_device():
    assert [r["docs example"] for r in results()] == [True] * WORLD


@pytest.mark.timeout(300)
def test_depthwise_context_parallel_slicing():
    for rank in (0, 1):
        assert all(results()[rank]["cp"].values()), results()[rank]["cp"]
