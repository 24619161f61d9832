"""Norm, reduction, softmax and loss rules on real Dynamo graphs, one process, a simulated 4-rank domain.

Every spelling Dynamo records must reach the rule (a missed spelling is refused
as an unknown op, or worse, declared local elsewhere); reductions that leave out
the sharded dim must stay local with the sharded dim moved; and the layouts that
cannot be made exact must be refused by name.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxhalo import FxHaloError
from fxhalo.layout import Sharded, sharding_of
from fxhalo.ops import loss as loss_ops
from fxhalo.ops import norm as norm_ops
from fxhalo.ops import reduce as reduce_ops
from tests.passes.graphs import Lambda, passes_on

X = torch.randn(2, 4, 8, 6)  # local slab of a (2, 4, 32, 6) tensor on 4 ranks
S = Sharded(2, 8, 32)


KERNEL_MODULES = ("fxhalo.ops.norm", "fxhalo.ops.reduce", "fxhalo.ops.loss")


def kernels(gm):
    return [
        n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__module__", "") in KERNEL_MODULES
    ]


def outputs(gm):
    return [sharding_of(a) for a in next(n for n in gm.graph.nodes if n.op == "output").args[0]]


@pytest.mark.parametrize(
    "fn, kernel",
    [
        (lambda x: x.sum(), reduce_ops.sum_),
        (lambda x: torch.sum(x, 2), reduce_ops.sum_),
        (lambda x: x.sum(dim=(2, 3), keepdim=True), reduce_ops.sum_),
        (lambda x: x.mean(dim=-2), reduce_ops.mean),
        (lambda x: torch.mean(x, (1, 2)), reduce_ops.mean),
        (lambda x: x.amax(2), reduce_ops.amax),
        (lambda x: torch.amin(x, dim=(0, 2)), reduce_ops.amin),
        (lambda x: x.max(), reduce_ops.amax),
        (lambda x: torch.min(x), reduce_ops.amin),
        (lambda x: x.var(2, unbiased=False), reduce_ops.var),
        (lambda x: torch.var(x, correction=0), reduce_ops.var),
        (lambda x: x.std(), reduce_ops.std),
        (lambda x: torch.std(x, 2, keepdim=True), reduce_ops.std),
        (lambda x: F.adaptive_avg_pool2d(x, 1), reduce_ops.adaptive_avg_pool),
        (lambda x: F.adaptive_max_pool2d(x, (1, 3)), reduce_ops.adaptive_max_pool),
        (lambda x: F.softmax(x, 2), reduce_ops.softmax),
        (lambda x: torch.softmax(x, -2), reduce_ops.softmax),
        (lambda x: x.softmax(2), reduce_ops.softmax),
        (lambda x: x.log_softmax(dim=2), reduce_ops.log_softmax),
        (lambda x: F.log_softmax(x, -2), reduce_ops.log_softmax),
        (lambda x: F.group_norm(x, 2), norm_ops.group_norm),
        (lambda x: F.layer_norm(x, x.shape[-2:]), norm_ops.layer_norm),
        (lambda x: F.mse_loss(x, x.sin()), loss_ops.mse_loss),
        (lambda x: F.l1_loss(x, x.cos(), reduction="sum"), loss_ops.l1_loss),
        (lambda x: F.smooth_l1_loss(x, 2 * x), loss_ops.smooth_l1_loss),
    ],
)
def test_each_spelling_becomes_one_kernel_with_a_replicated_or_sharded_result(fn, kernel):
    gm, changed = passes_on(Lambda(fn), X)
    found = kernels(gm)
    assert changed == 1 and [n.target for n in found] == [kernel]
    sdim = found[0].kwargs["axes"][0]  # the one sharded mesh axis
    assert sdim.dim == 2 and sdim.group_name == "sim"
    softmax_or_norm = kernel.__module__ == "fxhalo.ops.norm" or "softmax" in kernel.__name__
    assert outputs(gm) == [S if softmax_or_norm else None]


@pytest.mark.parametrize(
    "module",
    [
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.BatchNorm2d(4),
        nn.InstanceNorm2d(4, track_running_stats=True),
    ],
)
def test_norm_modules_become_the_kernels(module):
    gm, changed = passes_on(module, X)
    assert changed == 1 and len(kernels(gm)) == 1 and outputs(gm) == [S]


@pytest.mark.parametrize(
    "fn, want",
    [
        (lambda x: x.sum(3), S),
        (lambda x: x.mean(1), Sharded(1, 8, 32)),
        (lambda x: x.amax((0, 1)), Sharded(0, 8, 32)),
        (lambda x: x.var(3, keepdim=True), S),
        (lambda x: x.max(dim=3)[0], S),
        (lambda x: torch.max(x, x.cos()), S),
        (lambda x: F.softmax(x, 3), S),
        (lambda x: F.layer_norm(x, x.shape[-1:]), S),
        (lambda x: F.mse_loss(x, x.sin(), reduction="none"), S),
    ],
)
def test_reductions_that_leave_out_the_sharded_dim_stay_local(fn, want):
    gm, changed = passes_on(Lambda(fn), X)
    assert changed == 0 and not kernels(gm)
    assert outputs(gm) == [want]


def test_eval_mode_and_batch_sharded_norms_stay_local():
    gm, changed = passes_on(nn.BatchNorm2d(4).eval(), X)
    assert changed == 0 and outputs(gm) == [S]
    gm, changed = passes_on(Lambda(lambda x: F.group_norm(x, 2)), X, xs=0)  # sharded along the batch
    assert changed == 0 and outputs(gm) == [Sharded(0, 2, 8)]


def test_class_losses_take_targets_sharded_along_the_same_pixels():
    logits, classes = torch.randn(2, 5, 8, 6), torch.randint(0, 5, (2, 8, 6))
    gm, _ = passes_on(Lambda(lambda z, t: F.cross_entropy(z, t)), logits, classes, **{"xs[1]": 1})
    assert [n.target for n in kernels(gm)] == [loss_ops.cross_entropy]
    with pytest.raises(FxHaloError, match="target sharded as"):  # shard_dim=2 is W for [N, H, W] targets
        passes_on(Lambda(lambda z, t: F.cross_entropy(z, t)), logits, classes)


@pytest.mark.parametrize(
    "fn, inputs, match",
    [
        (lambda x: x.max(dim=2), (X,), "argmax indices along the sharded dim"),
        (lambda x, w: F.layer_norm(x, x.shape[-2:], w), (X, torch.ones(8, 6)), "weight"),
        (lambda x, t: F.mse_loss(x, t), (X, torch.randn(2, 4, 1, 6)), "another layout or shape"),
        (lambda x: F.group_norm(x.transpose(1, 2), 2), (X,), "channel dim"),
    ],
)
def test_what_cannot_be_exact_is_refused_by_name(fn, inputs, match):
    with pytest.raises(FxHaloError, match=match):
        passes_on(Lambda(fn), *inputs)


@pytest.mark.timeout(120)
def test_normalize_is_local_along_another_dim_and_refused_along_the_sharded_one():
    """``F.normalize`` (Swin V2's cosine attention in timm) had no rule and was refused as an unknown op."""
    gm, changed = passes_on(Lambda(lambda x: F.normalize(x, dim=-1) + F.normalize(x, p=1, dim=1)), X)
    assert changed == 0 and outputs(gm) == [S]
    with pytest.raises(FxHaloError, match="normalizes along the sharded dim 2"):
        passes_on(Lambda(lambda x: F.normalize(x, dim=2)), X)
