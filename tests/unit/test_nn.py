"""The eager layer in one process: state dicts, convert_to_domain_parallel's decisions, the depthwise convs.

No process group is initialised here, so every wrapper runs its plain torch op
(the world-size-1 guarantee); the multi-rank behaviour is in
``tests/distributed/test_nn.py``.
"""

from __future__ import annotations

import collections
import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxhalo
from fxhalo import nn as dpnn

pytestmark = pytest.mark.timeout(60)


class PeriodicConv2d(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.padding = k // 2
        self.conv = nn.Conv2d(cin, cout, k)

    def forward(self, x):
        p = self.padding
        return self.conv(F.pad(F.pad(x, (p, p, 0, 0), mode="circular"), (0, 0, p, p), mode="reflect"))


class Block(nn.Module):
    """A user container: children only, so convert walks into it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def small_model() -> nn.Module:
    """Every wrapper kind that runs on a (B, 4, H, W) tensor, in one model."""
    return nn.Sequential(
        collections.OrderedDict(
            [
                ("stem", nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")),
                ("block", Block(8)),
                ("inorm", nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
                ("bnorm", nn.BatchNorm2d(8)),
                ("periodic", PeriodicConv2d(8, 8, 3)),
                ("down", nn.Conv2d(8, 8, 3, stride=2, padding=1)),
                ("pool", nn.MaxPool2d(3, 1, 1)),
                ("up", nn.ConvTranspose2d(8, 8, 3, 2, 1, 1)),
                ("resize", nn.Upsample(scale_factor=2, mode="bilinear")),
                ("depthwise", fxhalo.DistributedDepthwiseConv2d(8, 3, num_groups=4, bias=True, device="cpu")),
                ("head", nn.Conv2d(8, 2, 1)),
            ]
        )
    )


def convert(model, **kwargs):
    return fxhalo.convert_to_domain_parallel(
        model, custom_converters={PeriodicConv2d: lambda m: dpnn.DomainParallelPeriodicConv2d(m)}, **kwargs
    )


# -- state dicts and the world-size-1 guarantee ---------------------------------------------


def test_state_dict_keys_and_values_equal_the_plain_model():
    torch.manual_seed(0)
    plain = small_model()
    want = plain.state_dict()
    converted = convert(copy.deepcopy(plain))
    got = converted.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert type(converted.periodic).__name__ == "DomainParallelPeriodicConv2d"
    # The state dict records each module's version; BatchNorm's (2) survives wrapping.
    assert got._metadata["bnorm"]["version"] == want._metadata["bnorm"]["version"] == 2


def test_checkpoints_load_both_ways_strictly():
    torch.manual_seed(0)
    plain_a, plain_b = small_model(), small_model()
    converted = convert(copy.deepcopy(plain_b))
    converted.load_state_dict(plain_a.state_dict())  # strict: no missing or unexpected keys
    for k, v in plain_a.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    fresh = small_model()
    fresh.load_state_dict(converted.state_dict())
    for k, v in converted.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_wrappers_share_the_wrapped_parameters_and_expose_weight_and_bias():
    conv = nn.Conv2d(2, 3, 3)
    w = dpnn.DomainParallelConv2d(conv)
    assert w.weight is conv.weight and w.bias is conv.bias
    periodic = PeriodicConv2d(2, 3, 3)
    pw = dpnn.DomainParallelPeriodicConv2d(periodic)
    assert pw.weight is periodic.conv.weight and pw.bias is periodic.conv.bias
    gn = dpnn.DomainParallelGroupNorm(nn.GroupNorm(1, 3, affine=False))
    assert gn.weight is None and gn.bias is None
    assert list(dict(w.named_parameters())) == ["weight", "bias"]


def test_without_a_process_group_the_converted_model_is_the_plain_model():
    torch.manual_seed(0)
    plain = small_model()
    converted = convert(copy.deepcopy(plain))
    for mode in ("train", "train", "eval"):
        plain.train(mode == "train")
        converted.train(mode == "train")
        x = torch.randn(2, 4, 8, 6)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), converted(xb)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    for (name, a), b in zip(plain.named_parameters(), converted.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), converted.buffers()):
        assert torch.equal(a, b), name  # running statistics advanced identically


def test_converted_models_deepcopy_and_pickle():
    converted = convert(small_model())
    clone = pickle.loads(pickle.dumps(copy.deepcopy(converted)))
    x = torch.randn(1, 4, 8, 6)
    converted.eval()
    clone.eval()
    assert torch.equal(clone(x), converted(x))


def test_interpolate_arguments_are_checked_like_torch():
    with pytest.raises(ValueError, match="exactly one"):
        dpnn.DomainParallelInterpolate()
    with pytest.raises(ValueError, match="align_corners"):
        dpnn.DomainParallelInterpolate(scale_factor=2, mode="nearest", align_corners=True)
    with pytest.raises(ValueError, match="mode"):
        dpnn.DomainParallelInterpolate(scale_factor=2, mode="area")
    up = dpnn.DomainParallelInterpolate.from_upsample(nn.UpsamplingBilinear2d(scale_factor=2))
    assert (up.mode, up.align_corners, up.scale_factor) == ("bilinear", True, 2.0)


def test_wrapping_the_wrong_type_or_a_lazy_layer_is_refused():
    with pytest.raises(fxhalo.FxHaloError, match="wraps Conv2d"):
        dpnn.DomainParallelConv2d(nn.Conv1d(1, 1, 3))
    with pytest.raises(fxhalo.FxHaloError, match="lazy"):
        dpnn.DomainParallelConv2d(nn.LazyConv2d(3, 3))


# -- convert_to_domain_parallel ---------------------------------------------------------------


def test_convert_replaces_what_communicates_and_leaves_local_layers():
    model = convert(small_model())
    kinds = {name: type(m).__name__ for name, m in model.named_children()}
    assert kinds == {
        "stem": "DomainParallelConv2d",
        "block": "Block",
        "inorm": "DomainParallelInstanceNorm",
        "bnorm": "DomainParallelBatchNorm",
        "periodic": "DomainParallelPeriodicConv2d",
        "down": "DomainParallelConv2d",
        "pool": "DomainParallelPool",
        "up": "DomainParallelConvTranspose2d",
        "resize": "DomainParallelInterpolate",
        "depthwise": "DistributedDepthwiseConv2d",
        "head": "Conv2d",  # 1x1: reads only its own row
    }
    assert type(model.block.conv).__name__ == "DomainParallelConv2d"
    assert type(model.block.norm).__name__ == "DomainParallelGroupNorm"
    assert type(model.block.act) is nn.SiLU
    assert model.depthwise.domain_parallel and model.depthwise.shard_dim == -2
    # The periodic wrapper's inner conv is its own business, not converted again.
    assert type(model.periodic.conv) is nn.Conv2d


def test_convert_is_idempotent_and_returns_a_replaced_root():
    model = convert(small_model())
    before = [type(m) for m in model.modules()]
    assert convert(model) is model
    assert [type(m) for m in model.modules()] == before
    root = fxhalo.convert_to_domain_parallel(nn.Conv2d(2, 2, 3, padding=1))
    assert isinstance(root, dpnn.DomainParallelConv2d)


def test_a_module_shared_by_two_parents_is_converted_once():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    fxhalo.convert_to_domain_parallel(model)
    assert model[0] is model[2] and isinstance(model[0], dpnn.DomainParallelConv2d)


def test_local_layers_by_dim():
    model = nn.Sequential(
        nn.Linear(6, 6),
        nn.LayerNorm(6),
        nn.Softmax(dim=-1),
        nn.Flatten(-1, -1),
        nn.Conv2d(3, 3, (1, 3), padding=(0, 1)),
        nn.Dropout2d(),
        nn.PixelShuffle(2),
        nn.Identity(),
    )
    before = [type(m) for m in model]
    fxhalo.convert_to_domain_parallel(model, shard_dim=-2)
    assert [type(m) for m in model] == before


def test_one_conv_family_class_reads_the_dimensionality_from_the_module():
    defaults = {1: -1, 2: -2, 3: 3}  # DomainParallelConv{1,2,3}d's, kept by the family class
    for nd, conv, conv_t in (
        (1, nn.Conv1d(2, 2, 3), nn.ConvTranspose1d(2, 2, 3)),
        (2, nn.Conv2d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3)),
        (3, nn.Conv3d(2, 2, 3), nn.ConvTranspose3d(2, 2, 3)),
    ):
        for family, module in ((dpnn.DomainParallelConv, conv), (dpnn.DomainParallelConvTranspose, conv_t)):
            w = family(module)
            assert (w.nd, w.shard_dim) == (nd, defaults[nd])
            x = torch.randn(1, 2, *[5] * nd)
            assert torch.equal(w(x), module(x))  # no process group: the plain op
    assert isinstance(dpnn.DomainParallelConv2d(nn.Conv2d(1, 1, 1)), dpnn.DomainParallelConv)
    with pytest.raises(fxhalo.FxHaloError, match="wraps Conv1d, Conv2d, Conv3d, not ConvTranspose2d"):
        dpnn.DomainParallelConv(nn.ConvTranspose2d(1, 1, 3))


def test_global_pool_and_softmax_along_the_shard():
    """The compiled rules reduce over the shard here; convert wraps them instead of refusing."""
    model = nn.Sequential(
        nn.Softmax(dim=-2), nn.LogSoftmax(dim=-1), nn.AdaptiveAvgPool2d((1, 3)), nn.AdaptiveMaxPool2d(1)
    )
    fxhalo.convert_to_domain_parallel(model, shard_dim=-2)
    assert [type(m).__name__ for m in model] == [
        "DomainParallelSoftmax",
        "LogSoftmax",  # along another dim: local
        "DomainParallelPool",
        "DomainParallelPool",
    ]
    x = torch.randn(2, 3, 8, 5)  # without a process group the wrappers are the plain ops
    assert torch.equal(model[0](x), torch.softmax(x, -2))
    assert torch.equal(model[2](x), F.adaptive_avg_pool2d(x, (1, 3)))


def test_custom_converters_come_first_and_their_children_are_skipped():
    seen = []

    def mine(m):
        seen.append(m)
        return dpnn.DomainParallelConv2d(m, shard_dim=-2)

    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), Block(2))
    first = model[0]
    fxhalo.convert_to_domain_parallel(model, custom_converters={nn.Conv2d: mine, Block: lambda m: None})
    assert seen == [first] and isinstance(model[0], dpnn.DomainParallelConv2d)
    # Returning None keeps the Block, and nothing inside it was looked at or replaced.
    assert type(model[1]) is Block and type(model[1].conv) is nn.Conv2d


class Odd(nn.Module):
    """An unknown leaf: convert cannot tell what it does to the sharded dim."""

    def forward(self, x):
        return torch.roll(x, 1, dims=-2)


class WithPosEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 2, 8, 8))
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x + self.pos)


class MyConv(nn.Conv2d):
    def forward(self, x):  # a conv with its own forward is not a Conv2d to convert
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "module, path, words",
    [
        (nn.Sequential(nn.Conv2d(2, 2, 3), nn.Sequential(nn.ReLU(), Odd())), "1.1 (Odd)", "does not know"),
        (nn.Sequential(WithPosEmbedding()), "0 (WithPosEmbedding)", "parameters/buffers of its own (pos)"),
        (nn.Sequential(nn.ZeroPad2d((0, 0, 1, 1))), "0 (ZeroPad2d)", "pads the sharded dim"),
        # (values only, pooling to one row is a global pool: see test_global_pool_and_softmax_along_the_shard)
        (nn.Sequential(nn.AdaptiveMaxPool2d(1, return_indices=True)), "0 (AdaptiveMaxPool2d)", "to one row"),
        (nn.Sequential(nn.Softmax(dim=1)), "0 (Softmax)", "depends on the input's rank"),
        (nn.Sequential(nn.MultiheadAttention(4, 2)), "0 (MultiheadAttention)", "parameters/buffers of its own"),
        (nn.Sequential(MyConv(2, 2, 3)), "0 (MyConv)", "parameters/buffers of its own (weight, bias)"),
        (nn.Sequential(nn.LazyConv2d(2, 3)), "0 (LazyConv2d)", "lazy"),
        (nn.Sequential(nn.SyncBatchNorm(2)), "0 (SyncBatchNorm)", "data-parallel"),
        (nn.Sequential(nn.Conv1d(2, 2, 3)), "0 (Conv1d)", "channel dim"),
    ],
)
def test_refusals_name_the_path_and_leave_the_model_unchanged(module, path, words):
    before = [type(m) for m in module.modules()]
    with pytest.raises(fxhalo.FxHaloError) as info:
        fxhalo.convert_to_domain_parallel(module, shard_dim=-2)
    message = str(info.value)
    assert f"\n  {path}" in message and words in message and "Remedy" in message, message
    assert [type(m) for m in module.modules()] == before


def test_layer_and_rms_norm_over_the_sharded_dim_are_wrapped_and_left_alone_elsewhere():
    model = nn.Sequential(nn.LayerNorm([8, 8]), nn.RMSNorm([6, 8]), nn.LayerNorm(8), nn.RMSNorm(8))
    fxhalo.convert_to_domain_parallel(model, shard_dim=-2)
    assert [type(m).__name__ for m in model] == ["DomainParallelLayerNorm"] * 2 + ["LayerNorm", "RMSNorm"]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "2.weight", "2.bias", "3.weight"}


def test_linear_refused_only_on_the_last_dim():
    fxhalo.convert_to_domain_parallel(nn.Sequential(nn.Linear(4, 4)), shard_dim=-2)
    with pytest.raises(fxhalo.FxHaloError, match="includes the sharded dim -1"):
        fxhalo.convert_to_domain_parallel(nn.Sequential(nn.Linear(4, 4)), shard_dim=-1)
    with pytest.raises(fxhalo.FxHaloError, match="depends on the input's rank"):
        fxhalo.convert_to_domain_parallel(nn.Sequential(nn.Linear(4, 4)), shard_dim=2)


def test_every_refusal_is_listed_at_once():
    model = nn.Sequential(Odd(), nn.Conv2d(2, 2, 3), nn.ZeroPad2d((0, 0, 1, 1)))
    with pytest.raises(fxhalo.FxHaloError, match="2 module") as info:
        fxhalo.convert_to_domain_parallel(model)
    assert "0 (Odd)" in str(info.value) and "2 (ZeroPad2d)" in str(info.value)
    assert type(model[1]) is nn.Conv2d  # nothing converted while anything is refused


def test_allow_unconverted_accepts_types_and_still_converts_inside():
    model = nn.Sequential(Odd(), WithPosEmbedding())
    fxhalo.convert_to_domain_parallel(model, allow_unconverted=(Odd, WithPosEmbedding))
    assert type(model[0]) is Odd and type(model[1]) is WithPosEmbedding
    assert isinstance(model[1].conv, dpnn.DomainParallelConv2d)


# -- validate_sharding_constraints --------------------------------------------------------------


class Windowed(nn.Module):
    def __init__(self, window_size):
        super().__init__()
        self.window_size = window_size
        self.proj = nn.Linear(4, 4)


def encoder(windows=(4, 4, 2)):
    return nn.Sequential(
        Windowed(windows[0]),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        Windowed(windows[1]),
        nn.MaxPool2d(2),
        Windowed(windows[2]),
        nn.ConvTranspose2d(4, 4, 2, 2),
    )


def test_validate_sharding_constraints_passes_when_everything_divides():
    assert fxhalo.validate_sharding_constraints(encoder(), 16) == []
    assert fxhalo.validate_sharding_constraints(encoder(), 16, window_sizes=[8, 4, 2]) == []


def test_validate_sharding_constraints_names_strides_and_windows():
    messages = fxhalo.validate_sharding_constraints(encoder((2, 4, 4)), 10)
    assert len(messages) == 3, messages
    assert "2 (Windowed): window size 4 does not divide the local length 5 at level 1" in messages[0]
    assert "3 (MaxPool2d): stride 2 does not divide the local length 5 at level 1" in messages[1]
    assert "4 (Windowed): window size 4 does not divide the local length 2 at level 2" in messages[2]
    messages = fxhalo.validate_sharding_constraints(encoder(), 16, window_sizes=[8, 8, 2, 1])
    assert len(messages) == 1 and "window_sizes[3] = 1: the model has only 3 levels" in messages[0], messages
    messages = fxhalo.validate_sharding_constraints(encoder(), 16, window_sizes=[8, 16])
    assert messages == ["level 1: window size 16 does not divide the local length 8"]


# -- DistributedDepthwiseConv1d / 2d ----------------------------------------------------------------


def test_depthwise_shapes_and_parameters():
    m = fxhalo.DistributedDepthwiseConv1d(8, 5, num_groups=2, bias=True)
    assert m.weight.shape == (2, 5) and m.bias.shape == (2,) and m.group_dim == 4
    assert m.weight.device.type == "cpu" and m.weight.dtype == torch.float32  # no CUDA here
    assert m(torch.randn(3, 8, 11)).shape == (3, 8, 11)
    m2 = fxhalo.DistributedDepthwiseConv2d(6, 3, dtype=torch.float64)
    assert m2.weight.shape == (6, 3, 3) and m2.bias is None and m2.num_groups == 6
    assert m2.kernel_size == (3, 3) and m2.weight.dtype == torch.float64
    assert m2(torch.randn(1, 6, 5, 4, dtype=torch.float64)).shape == (1, 6, 5, 4)


def test_depthwise_errors():
    with pytest.raises(AssertionError):
        fxhalo.DistributedDepthwiseConv1d(4, 3)(torch.randn(4, 10))
    with pytest.raises(AssertionError):
        fxhalo.DistributedDepthwiseConv2d(4, 3)(torch.randn(1, 4, 10))
    with pytest.raises(RuntimeError, match="expected 4"):
        fxhalo.DistributedDepthwiseConv1d(4, 3)(torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="must divide"):
        fxhalo.DistributedDepthwiseConv1d(6, 3, num_groups=4)


def test_depthwise_init_bounds():
    torch.manual_seed(0)
    for m, bound in (
        (fxhalo.DistributedDepthwiseConv1d(512, 9, bias=True), 1 / 3),
        (fxhalo.DistributedDepthwiseConv2d(512, (2, 8), bias=True), 1 / 4),
    ):
        for p in (m.weight, m.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound
        assert math.isclose(bound, math.sqrt(1 / math.prod(m.weight.shape[1:])))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_depthwise_is_a_grouped_conv_with_repeated_filters():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 12)
    for k in (3, 4):
        m = fxhalo.DistributedDepthwiseConv1d(6, k, causal=True, num_groups=3, bias=True)
        w, b = m.weight.repeat_interleave(2, 0).unsqueeze(1), m.bias.repeat_interleave(2)
        assert torch.allclose(m(x), F.conv1d(F.pad(x, (k - 1, 0)), w, b, groups=6))
        # Causal: changing the future leaves the past alone.
        later = x.clone()
        later[..., 7:] += 1
        assert torch.equal(m(later)[..., :7], m(x)[..., :7])
        m.causal = False
        assert torch.allclose(m(x), F.conv1d(x, w, b, padding="same", groups=6))
    m2 = fxhalo.DistributedDepthwiseConv2d(4, (3, 2), num_groups=2, bias=True)
    x2 = torch.randn(1, 4, 5, 6)
    w2 = m2.weight.repeat_interleave(2, 0).unsqueeze(1)
    assert torch.allclose(m2(x2), F.conv2d(x2, w2, m2.bias.repeat_interleave(2), padding="same", groups=4))
