"""2-D domain decomposition: H and W sharded over a DeviceMesh, corners included (fxhalo.mesh).

Every rank holds block (i, j) of each input, passes it as a plain tensor with
``options={"group": mesh, "shard_dim": (2, 3)}``, and checks its block of the forward,
its block of the input gradient and the whole weight gradients (summed over the whole
domain by grad_sync) against one device on the full tensor.  One group of ranks per
mesh shape: 2 x 2 (13 rows split 7 + 6) and 2 x 3 (10 columns split 4 + 3 + 3).
The cases of one input rank are compiled as one graph.  Besides the hand-picked cases,
24 random convs per mesh (2-D, and 3-D on two of their dims; uneven sizes, every padding
kind and mode, strides, dilations, groups) and 12 random resampling and normalising layers
(interpolations, avg, max and adaptive pools, GroupNorm / InstanceNorm / BatchNorm).

What must raise on every rank: a shard_dim tuple of the wrong length, a dim named
twice, a mesh axis that is not in the mesh, and a reshape merging H and W on plain
blocks (two axes on one dim; the global view handles it, test_mesh_global_view.py).
And a small UNet trains 10 SGD steps on each mesh as on one device.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.harness import check_many_on_mesh, failed_cases, raised, run_ranks
from tests.passes.graphs import Lambda


class PadThenConv(nn.Module):
    """The periodic-longitude, pole-reflect case: circular along W, reflect along H, then a valid conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        x = F.pad(x, (1, 1, 0, 0), mode="circular")
        x = F.pad(x, (0, 0, 1, 1), mode="reflect")
        return self.conv(x)


class Centered(nn.Module):
    """A spatial mean over both sharded dims (one all-reduce over the whole domain), subtracted."""

    def forward(self, x):
        return x - x.mean((2, 3), keepdim=True) + x.var((2, 3), keepdim=True)


class SumStd(nn.Module):
    def forward(self, x):
        return x * x.sum((2, 3), keepdim=True) + x.std((2, 3), keepdim=True)


class RollFlip(nn.Module):
    def forward(self, x):
        return torch.roll(x, (3, -2), (2, 3)).flip(3) * 2


class Losses(nn.Module):
    """Losses over both sharded dims (mse mean, l1 sum, cross-entropy on class-index targets made from the
    input): one all-reduce over the whole domain each.  They scale the field, so that the checks see each
    loss's value and gradient."""

    def forward(self, x):
        mse = F.mse_loss(x, torch.tanh(x))
        l1 = F.l1_loss(x, x.sin(), reduction="sum")
        ce = F.cross_entropy(x, (x.sum(1) > 0).long())
        return x * (mse + 0.01 * l1 + ce)


class Extremes(nn.Module):
    """amax/amin over both sharded dims and the global adaptive pools (to 1 x 1)."""

    def forward(self, x):
        top = x.amax((2, 3), keepdim=True) - x.amin((-1, -2), keepdim=True)
        return x * top + F.adaptive_avg_pool2d(x, 1) * F.adaptive_max_pool2d(x, (1, 1))


class Softmaxes(nn.Module):
    """Softmax along H and log-softmax along W: each along one axis's dim, by that axis's 1-D kernel."""

    def forward(self, x):
        return x.softmax(2) + F.log_softmax(x, dim=3)


class MaxPoolIndices(nn.Module):
    """A max pool's values scaled by a function of its indices: wrong indices change the output."""

    def __init__(self, *args, adaptive: bool = False):
        super().__init__()
        pool = nn.AdaptiveMaxPool2d if adaptive else nn.MaxPool2d
        self.pool = pool(*args, return_indices=True)

    def forward(self, x):
        values, indices = self.pool(x)
        return values * (indices % 7 + 1)


def _ties():
    """Small integers on a 12 x 10 field: many tied maxima in every pooling window."""
    return torch.randint(0, 3, (2, 2, 12, 10)).float()


def _minus_inf_corner(x):
    """``x`` with its first 3 rows and columns ``-inf``: windows there read nothing but ``-inf`` and pad."""
    x = x.clone()
    x[..., :3, :] = float("-inf")
    x[..., :, :3] = float("-inf")
    return x


def _cases_2d():
    """(name, model, input) of the 4-D cases; every spatial op reaches across both sharded dims."""

    def x(c=2):
        return torch.randn(2, c, 13, 10)

    return [
        ("conv3", nn.Conv2d(2, 3, 3, padding=1), x()),
        ("conv5_stride2", nn.Conv2d(2, 3, 5, stride=2, padding=2), x()),
        ("conv3_dilation2", nn.Conv2d(2, 3, 3, padding=2, dilation=2), x()),
        ("conv4_stride2", nn.Conv2d(2, 3, 4, stride=2, padding=1), x()),
        ("conv_same_even", nn.Conv2d(2, 3, (4, 2), padding="same"), x()),
        ("conv1x3_and_3x1", nn.Sequential(nn.Conv2d(2, 3, (1, 3), padding=(0, 1)), nn.Conv2d(3, 2, (3, 1))), x()),
        ("circular_w_reflect_h", PadThenConv(), x()),
        ("conv_reflect_mode", nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), x()),
        ("conv_circular_mode", nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"), x()),
        ("group_norm", nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU()), x()),
        ("instance_norm", nn.Sequential(nn.InstanceNorm2d(2, affine=True), nn.Conv2d(2, 2, 3, padding=1)), x()),
        ("batch_norm", nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)), x()),
        # a norm's statistics with the next op's block halo, in one exchange (fxhalo.passes.fuse)
        (
            "group_norm_gelu_conv3",
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(), nn.Conv2d(4, 3, 3, padding=1)),
            x(),
        ),
        # not fused: a max pool takes its rows from no norm, for now (fxhalo.passes.fuse._fusible_consumer)
        ("batch_norm_relu_max_pool_padded", nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), x()),
        (
            "instance_norm_silu_bilinear",
            nn.Sequential(nn.InstanceNorm2d(2, affine=True), nn.SiLU(), nn.Upsample(scale_factor=2, mode="bilinear")),
            x(),
        ),
        ("mean_var", Centered(), x()),
        ("sum_std", SumStd(), x()),
        ("roll_flip", RollFlip(), x()),
        (  # local on even blocks: each rank's rows and columns halve, then double
            "pixel_unshuffle_shuffle",
            nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(8, 8, 3, padding=1), nn.PixelShuffle(2)),
            torch.randn(1, 2, 12, 12),
        ),
        ("losses", Losses(), x()),
        ("amax_amin_global_pools", Extremes(), x()),
        ("softmax_h_log_softmax_w", Softmaxes(), x()),
        ("max_pool", nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2)), x()),
        ("max_pool_k3s2", nn.MaxPool2d(3, 2), x()),
        ("avg_pool_pad", nn.AvgPool2d(3, 2, 1, count_include_pad=False), x()),
        ("avg_pool_ceil", nn.AvgPool2d(2, ceil_mode=True), x()),
        # bins straddling uneven blocks along both dims: the block's halo, then torch's adaptive op
        ("adaptive_avg_pool_4x3", nn.AdaptiveAvgPool2d((4, 3)), x()),
        ("adaptive_max_pool_4x3", nn.AdaptiveMaxPool2d((4, 3)), x()),
        ("conv_transpose_k4s2", nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1), x()),
        ("conv_transpose_k3s2", nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), x()),
        # one axis communicates, through its 1-D kernel, while the other dim stays a sharded local block
        ("bilinear_along_h_only", nn.Upsample(scale_factor=(2, 1), mode="bilinear"), x()),
        ("bilinear_x2", nn.Upsample(scale_factor=2, mode="bilinear"), x()),
        ("bicubic_down_aligned", nn.Upsample(scale_factor=0.5, mode="bicubic", align_corners=True), x()),
        ("nearest_x3", nn.Upsample(scale_factor=3, mode="nearest"), x()),
        # padding and indices (refused before): -inf fill past both global edges, the picks of all -inf
        # windows moved to their first real cell, the indices global
        ("max_pool_padded", nn.MaxPool2d(3, 2, 1), x()),
        ("max_pool_padded_dilated_ceil", nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), x()),
        ("max_pool_indices", MaxPoolIndices(3, 2, 1), x()),
        ("max_pool_indices_minus_inf_corner", MaxPoolIndices(3, 2, 1), _minus_inf_corner(x())),
        # pooled to one value along one sharded dim and to windows along the other (refused before): dim by
        # dim, innermost first; small integers make ties, which go to the first maximum as on one device
        ("adaptive_avg_to_1x5", nn.AdaptiveAvgPool2d((1, 5)), x()),
        ("adaptive_max_to_1x5_ties", nn.AdaptiveMaxPool2d((1, 5)), _ties()),
        ("adaptive_max_to_4x1_ties", nn.AdaptiveMaxPool2d((4, 1)), _ties()),
        # indices into the global input (refused before): made global dim by dim, innermost first (to one
        # row along a sharded dim, indices stay refused, as in 1-D: that is a reduction)
        ("adaptive_max_indices_4x3", MaxPoolIndices((4, 3), adaptive=True), x()),
        ("adaptive_max_indices_4x5_ties", MaxPoolIndices((4, 5), adaptive=True), _ties()),
        # a size is global along both sharded dims (refused before: the kernel took scale factors only)
        ("bilinear_to_size", nn.Upsample(size=(20, 23), mode="bilinear"), x()),
        ("bicubic_to_size_down", nn.Upsample(size=(9, 7), mode="bicubic"), x()),
    ]


def _cases_3d():
    """A 3-D volume sharded on 2 of its 3 spatial dims (D and H; W whole)."""
    return [
        ("conv3d", nn.Conv3d(2, 3, 3, padding=1), torch.randn(1, 2, 7, 9, 5)),
        (
            "conv3d_norm",
            nn.Sequential(nn.Conv3d(2, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4)),
            torch.randn(1, 2, 7, 9, 5),
        ),
        ("trilinear_x2", nn.Upsample(scale_factor=2, mode="trilinear"), torch.randn(1, 2, 7, 9, 5)),
    ]


def _random_convs(mesh_shape, n: int, seed: int = 0):
    """``n`` random convs (2-D on H and W, or 3-D on D and H with W whole) whose global sizes split unevenly
    over the mesh: kernels 1-5, strides 1-3, dilations 1-2, every padding kind and padding_mode, groups.
    Kept when torch runs the conv on the whole input and on the smallest block (what Dynamo traces), and
    the output has at least one row per rank along each sharded dim."""
    import random

    rng = random.Random(seed * 100 + mesh_shape[0] * 10 + mesh_shape[1])
    cases = []
    while len(cases) < n:
        nd = rng.choice([2, 2, 2, 3])
        kernel = tuple(rng.randint(1, 5) for _ in range(nd))
        stride = tuple(rng.choice([1, 1, 2, 3]) for _ in range(nd))
        dilation = tuple(rng.choice([1, 1, 2]) for _ in range(nd))
        kind = rng.choice(["int", "tuple", "same", "valid"])
        padding = {"same": "same", "valid": "valid", "int": rng.randint(0, 2)}.get(
            kind, tuple(rng.randint(0, 2) for _ in range(nd))
        )
        stride = (1,) * nd if kind == "same" else stride
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        groups = rng.choice([1, 1, 2])
        conv = (nn.Conv2d if nd == 2 else nn.Conv3d)(
            2 * groups, 2 * rng.randint(1, 2), kernel, stride, padding, dilation, groups, rng.random() < 0.7, mode
        )
        spatial = [rng.randint(2 * p + 1, 13) for p in mesh_shape] + ([rng.randint(3, 5)] if nd == 3 else [])
        x = torch.randn(rng.choice([1, 2]), 2 * groups, *spatial)
        if _runs_on_mesh(conv, x, mesh_shape):
            cases.append((f"random_conv_{len(cases)}", conv, x))
    return cases


def _runs_on_mesh(layer, x, mesh_shape) -> bool:
    """Does torch run ``layer`` on the whole ``x`` and on the smallest block (what Dynamo traces), and
    does the output keep at least one row per rank along each sharded dim (dims 2, 3)?"""
    smallest = list(x.shape[2:])
    for a, p in enumerate(mesh_shape):
        smallest[a] //= p
    try:
        with torch.no_grad():
            layer(torch.zeros(1, x.shape[1], *smallest))
            out = layer(x)
    except RuntimeError:
        return False
    return all(out.shape[2 + a] >= p for a, p in enumerate(mesh_shape))


def _random_resamples_and_norms(mesh_shape, n: int, seed: int = 0):
    """``n`` random resampling and normalising layers on uneven 2-D fields: interpolations (every mode
    fxhalo splits, scale factors up and down, align_corners either way), avg and max pools, adaptive pools,
    and GroupNorm / InstanceNorm / BatchNorm after a conv.  Kept when torch runs them on the whole input and
    on the smallest block, and the output has at least one row per rank along each sharded dim."""
    import random

    rng = random.Random(seed * 100 + mesh_shape[0] * 10 + mesh_shape[1] + 7)
    cases = []
    while len(cases) < n:
        kind = rng.choice(["interpolate", "avg_pool", "max_pool", "adaptive", "norm"])
        c = rng.choice([2, 4])
        if kind == "interpolate":
            mode = rng.choice(["nearest", "nearest-exact", "bilinear", "bicubic"])
            scale = tuple(rng.choice([0.5, 1.5, 2.0, 3.0]) for _ in range(2))
            align = rng.choice([None, True]) if mode in ("bilinear", "bicubic") else None
            layer = nn.Upsample(scale_factor=scale, mode=mode, align_corners=align)
        elif kind == "avg_pool":
            k = rng.randint(2, 4)
            layer = nn.AvgPool2d(k, rng.randint(1, k), rng.randint(0, k // 2), rng.random() < 0.5, rng.random() < 0.5)
        elif kind == "max_pool":
            k = rng.randint(2, 4)
            s, p, d = rng.randint(1, k), rng.randint(0, k // 2), rng.choice([1, 2])
            layer = nn.MaxPool2d(k, s, p, d, ceil_mode=rng.random() < 0.5)
        elif kind == "adaptive":
            size = (rng.randint(2, 6), rng.randint(3, 6))
            layer = (nn.AdaptiveAvgPool2d if rng.random() < 0.5 else nn.AdaptiveMaxPool2d)(size)
        else:
            norm = rng.choice(
                [nn.GroupNorm(rng.choice([1, 2]), c), nn.InstanceNorm2d(c, affine=True), nn.BatchNorm2d(c)]
            )
            layer = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), norm)
        spatial = [rng.randint(2 * p + 1, 13) for p in mesh_shape]
        if kind == "adaptive":  # bins that straddle ranks are refused unless an output size divides the input
            spatial = [s * rng.randint(2, 3) for s in size]
        x = torch.randn(rng.choice([1, 2]), c, *spatial)
        if _runs_on_mesh(layer, x, mesh_shape):
            cases.append((f"random_{kind}_{len(cases)}", layer, x))
    return cases


class SkipUNet(nn.Module):
    """Two levels with a skip: conv, GroupNorm, a k4/s2 conv down, a k4/s2 transposed conv up, a cat."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.SiLU(), nn.AvgPool2d(3, 1, 1))
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.out = nn.Conv2d(8, 1, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        skip = self.enc(x)
        return self.out(torch.cat([self.up(self.down(skip)), skip], 1))


def _train(mesh, steps: int = 10) -> float:
    """10 SGD steps (lr 1e-3) on per-step random inputs and output gradients, on the mesh and on one
    device; the largest mean squared difference of a parameter, relative to its mean square."""
    from fxhalo.mesh import mesh_domain
    from tests.harness import mesh_block

    torch.manual_seed(1)
    ref = SkipUNet()
    sharded = SkipUNet()
    sharded.load_state_dict(ref.state_dict())
    domain = mesh_domain(mesh, (2, 3))
    compiled = torch.compile(
        sharded, backend="domain_parallel", options={"group": mesh, "shard_dim": (2, 3), "compiler": "aot_eager"}
    )
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-3)
    opt = torch.optim.SGD(sharded.parameters(), lr=1e-3)
    for _ in range(steps):
        x, g = torch.randn(2, 1, 16, 12), torch.randn(2, 1, 16, 12)
        opt_ref.zero_grad()
        ref(x).backward(g)
        opt_ref.step()
        opt.zero_grad()
        compiled(mesh_block(x, domain, (2, 3))).backward(mesh_block(g, domain, (2, 3)))
        opt.step()
    worst = 0.0
    for a, b in zip(ref.parameters(), sharded.parameters()):
        worst = max(worst, float((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-12)))
    return worst


def _refusals(mesh):
    """What must raise, on every rank, before any collective."""
    x = torch.randn(2, 2, 13, 10)
    conv = nn.Conv2d(2, 2, 3, padding=1)

    def compiled(**options):
        torch._dynamo.reset()
        return torch.compile(conv, backend="domain_parallel", options={"compiler": "aot_eager", **options})

    def on_mesh(model):
        torch._dynamo.reset()
        options = {"group": mesh, "shard_dim": (2, 3), "compiler": "aot_eager"}
        # 3 rows and columns a rank: windows straddle ranks along both dims
        return lambda: torch.compile(model, backend="domain_parallel", options=options)(x[..., :3, :3].contiguous())

    return {
        "dims_for_axes": raised(lambda: compiled(group=mesh, shard_dim=(2,))(x)),
        "too_many_dims": raised(lambda: compiled(group=mesh, shard_dim=(1, 2, 3))(x)),
        "dim_twice": raised(lambda: compiled(group=mesh, shard_dim=(2, 2))(x)),
        "unknown_axis": raised(lambda: compiled(group=(mesh, ("h", "depth")), shard_dim=(2, 3))(x)),
        # H and W merged into one dim on plain blocks (the global view gathers one axis first; blocks do not)
        "merge_h_and_w": raised(on_mesh(Lambda(lambda t: t.flatten(2).softmax(-1)))),
    }


def _received_by_a_padded_conv(mesh):
    """Elements this rank receives for a 3x3 conv with zero padding 1 on its block (the conv kernel called
    eagerly, as the graph calls it), and the minimum: a row of its block's width from each H neighbour, and a
    column of its block's height plus the corner values from each W neighbour; the zero row past the global
    edge is no one's to send (before: the W exchange carried it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fxhalo.domain import ShardAxis
    from fxhalo.mesh import mesh_domain
    from fxhalo.ops.conv import conv
    from tests.harness import mesh_block

    class Received(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops._c10d_functional.all_to_all_single.default:
                send, out_splits, group = args[0], args[1], args[3]
                own = torch.distributed.get_rank(torch.distributed.distributed_c10d._resolve_process_group(group))
                type(self).elements += (sum(out_splits) - out_splits[own]) * send[0].numel()
            return out

    x = torch.randn(1, 2, 13, 10)
    domain = mesh_domain(mesh, (2, 3))
    block = mesh_block(x, domain, (2, 3))
    axes = tuple(ShardAxis(d, mesh.get_group(a).group_name, x.shape[d]) for d, a in ((2, "h"), (3, "w")))
    with Received():
        conv(block, torch.randn(2, 2, 3, 3), None, 1, 1, axes=axes)
    (h, w), (i, j) = block.shape[2:], mesh.get_coordinate()
    up_down = (i > 0) + (i < mesh.shape[0] - 1)  # neighbours along each axis
    left_right = (j > 0) + (j < mesh.shape[1] - 1)
    return Received.elements, 2 * (up_down * w + left_right * (h + up_down))


def _logged(mesh) -> str:
    """What TORCH_LOGS=+fxhalo shows for a conv on the mesh (rank 0 logs; the others return "")."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("fxhalo.log")
    logger.addHandler(handler)
    torch._logging.set_logs(modules={"fxhalo": logging.DEBUG})
    try:
        torch._dynamo.reset()
        options = {"group": mesh, "shard_dim": (2, 3), "compiler": "eager"}
        conv = torch.compile(nn.Conv2d(2, 2, 3, padding=1), backend="domain_parallel", options=options)
        conv(torch.randn(1, 2, 5, 4))
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    return "\n".join(records)


def _run(rank, world_size, shape):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("h", "w"))
    out = {}
    # AOTAutograd traces the block kernels on the 2 x 2 mesh's hand cases (and in _train on both meshes);
    # the rest run the rewritten graph eagerly, as the 1-D sweeps do on more than 2 ranks (sweep_compiler)
    traced = "aot_eager" if shape == (2, 2) else "eager"
    for make, compiler in (
        (_cases_2d, traced),
        (_cases_3d, traced),
        (lambda: _random_convs(shape, 24), "eager"),
        (lambda: _random_resamples_and_norms(shape, 12), "eager"),
    ):
        torch.manual_seed(0)  # the same models and inputs on every rank
        cases = make()
        results = check_many_on_mesh([(m, x, i) for i, (_, m, x) in enumerate(cases)], mesh, (2, 3), compiler=compiler)
        out.update({name: {k: ok for k, (ok, _) in r.items()} for (name, _, _), r in zip(cases, results)})
    return out, _refusals(mesh), _train(mesh), _received_by_a_padded_conv(mesh), _logged(mesh)


MESHES = [(2, 2), (2, 3)]


@pytest.fixture(scope="module", params=MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def ranks(request):
    return run_ranks(_run, request.param[0] * request.param[1], request.param, timeout=400)


@pytest.mark.timeout(420)
def test_every_case_matches_one_device_on_every_rank(ranks):
    failures = failed_cases(ranks)
    assert not failures, failures[:6]
    assert len(ranks[0][0]) == len(_cases_2d()) + len(_cases_3d()) + 24 + 12


@pytest.mark.timeout(420)
def test_a_unet_trains_ten_sgd_steps_as_on_one_device(ranks):
    assert all(r[2] <= 1e-6 for r in ranks), [r[2] for r in ranks]


@pytest.mark.timeout(420)
def test_torch_logs_describes_each_axis_on_rank_0(ranks):
    text = ranks[0][4]
    assert "all_to_all[whole]" in text and "along whole:" in text, text[-2000:]
    assert all(r[4] == "" for r in ranks[1:])


@pytest.mark.timeout(420)
def test_the_exchange_with_corners_sends_no_padding(ranks):
    received = [r[3] for r in ranks]
    assert all(got == minimum for got, minimum in received), received


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "case, words",
    [
        ("dims_for_axes", ["shard_dim=(2,)", "1 dims for 2 domain mesh axes"]),
        ("too_many_dims", ["3 dims for 2"]),
        ("dim_twice", ["names one dim twice"]),
        ("unknown_axis", ["'depth'", "not an axis"]),
        ("merge_h_and_w", ["flatten", "two mesh axes would shard along one dim", "DomainTensors", "Remedy"]),
    ],
)
def test_bad_input_raises_on_every_rank(ranks, case, words):
    for _, refusals, *_ in ranks:
        message = refusals[case]
        assert message.startswith("FxHaloError"), message
        for word in words:
            assert word in message, message
