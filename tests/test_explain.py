"""fxhalo.explain in one process: rows, halo widths and bytes against hand arithmetic.

The model is :class:`fxhalo.models.SmallUNet` (width 8, GroupNorm with 4 groups) on a
global ``1 x 1 x 64 x 64`` fp32 input sharded along H (dim 2).  Its layers, in graph
order, and what each one's input looks like along H:

==============  ===========================  ================  ==========
layer           op                           input channels    input W
==============  ===========================  ================  ==========
enc.conv1       3x3 conv, pad 1              1                 64
enc.conv2       3x3 conv, pad 1              8                 64
down            3x3 conv, stride 2, pad 1    8                 64
mid.conv1/2     3x3 conv, pad 1              16                32
upsample        bilinear x2, corners False   16                32
dec.conv1       3x3 conv, pad 1 (on cat)     16 + 8 = 24       64
dec.conv2       3x3 conv, pad 1              8                 64
head            1x1 conv                     8                 64  (local)
6 x GroupNorm   one all_reduce each
==============  ===========================  ================  ==========

Most tests explain the graph as written (``fuse_exchanges=False``), where every layer
has its own collective.  ``test_fused_norms_send_their_statistics_with_the_halo`` checks
the default, where four GroupNorms send their statistics with the next conv's halo.

One row of an NCHW slab along H is ``B * C * W`` elements, so a halo of ``r`` rows
sent to one neighbour costs ``r * B * C * W * 4`` bytes in fp32.  Which wrong number
points where: a wrong *halo* means the geometry (fxhalo.geometry / the rule) changed;
a wrong *byte count* with the right halo means explain's measurement or the kernel's
send buffer changed.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fxhalo
from fxhalo.explain import _with_grad
from fxhalo.models import small_unet
from fxhalo.ops.moments import local_sums

B, W = 1, 64  # batch and width of the global input
F32 = 4
# Float64 statistics per group in a compiled norm's all_reduce: sum x and sum x^2.  (The
# compiled graph passes the global length, so the element count need not travel with them;
# see fxhalo.ops.moments.global_moments.)
_STATS = local_sums(torch.zeros(1, 1, 2, 2), (2, 3), with_count=False).shape[0]


def _explain(world_size, rank, **kw):
    """The graph as written (``fuse_exchanges=False``) unless a test asks for the fused one."""
    kw.setdefault("fuse_exchanges", False)
    torch.manual_seed(0)
    x = torch.randn(B, 1, 64 // world_size, W)  # this rank's slab of the 64 x 64 input
    return fxhalo.explain(small_unet(), x, world_size=world_size, rank=rank, **kw)


def _layers(ex):
    """The rows by layer kind, in graph order."""
    convs = [r for r in ex.rows if r.op == "torch.conv2d"]
    norms = [r for r in ex.rows if r.op == "torch.nn.functional.group_norm"]
    (up,) = [r for r in ex.rows if r.op == "torch.nn.functional.interpolate"]
    enc1, enc2, down, mid1, mid2, dec1, dec2 = convs  # the 1x1 head is local: no row
    return dict(enc1=enc1, enc2=enc2, down=down, mid1=mid1, mid2=mid2, dec1=dec1, dec2=dec2, up=up), norms


def _kinds(row):
    return [c.kind for c in row.collectives]


@pytest.mark.timeout(120)
def test_two_ranks_rank0_matches_hand_arithmetic():
    ex = _explain(2, 0)
    rows, norms = _layers(ex)
    assert not ex.problems and len([r for r in ex.rows if r.collectives]) == 7 + 6 + 1

    # enc.conv1: a 3x3 pad-1 conv needs 1 row from each side.  Rank 0's row above is the
    # zero padding (lo=1 is filled, not received); it sends its last row to rank 1:
    # 1 row * B(1) * C(1) * W(64) * 4 B = 256 B.
    assert rows["enc1"].halo == ((1, 1),) and rows["enc1"].edge == "zeros"
    assert _kinds(rows["enc1"]) == ["all_to_all"] and rows["enc1"].bytes_sent == 1 * B * 1 * W * F32 == 256
    # enc.conv2: the same with C=8: 1 * 1 * 8 * 64 * 4 = 2048 B.
    assert rows["enc2"].halo == ((1, 1),) and rows["enc2"].bytes_sent == 8 * W * F32 == 2048
    # down: k3 s2 p1 maps N=64 to M=32.  Rank 0 makes output rows 0..15, which read input
    # rows 2*0-1 = -1 .. 2*15-1+2 = 31: lo=1 (padding), hi=0.  Rank 1 makes 16..31, reading
    # 31..63: it needs row 31 from rank 0, so rank 0 sends 1 * 8 * 64 * 4 = 2048 B.
    assert rows["down"].halo == ((1, 0),) and rows["down"].bytes_sent == 2048
    # mid: 16 channels at H=32 (16 local), W=32: 1 * 16 * 32 * 4 = 2048 B per conv.
    assert rows["mid1"].halo == rows["mid2"].halo == ((1, 1),)
    assert rows["mid1"].bytes_sent == rows["mid2"].bytes_sent == 16 * 32 * F32 == 2048
    # bilinear x2, align_corners=False: output row o reads source (o + 0.5)/2 - 0.5.
    # Rank 0 makes o = 0..31: o=0 -> -0.25, clamped to row 0 (lo=0); o=31 -> 15.25 reads rows
    # 15 and 16 (hi=1).  Rank 1's o=32 -> 15.75 reads row 15, so rank 0 sends 1 row:
    # 1 * 16 * 32 * 4 = 2048 B.
    assert rows["up"].halo == ((0, 1),) and rows["up"].edge == "clamp" and rows["up"].bytes_sent == 2048
    # dec.conv1 reads cat([up (16 ch), skip (8 ch)]) at W=64: 1 * 24 * 64 * 4 = 6144 B.
    assert rows["dec1"].bytes_sent == 24 * W * F32 == 6144 and rows["dec2"].bytes_sent == 8 * W * F32
    # GroupNorm: one all_reduce of 2 float64 statistics (sum x, sum x^2) per (sample, group):
    # 2 * B(1) * G(4) * 8 B = 64 B, whatever the rank count.
    assert all(_kinds(n) == ["all_reduce"] and n.bytes_sent == _STATS * B * 4 * 8 for n in norms)
    assert all(r.shard_dim == 2 for r in ex.rows if r.collectives)

    halo_bytes = 256 + 2048 + 2048 + 2048 + 2048 + 2048 + 6144 + 2048
    d = ex.to_dict()
    assert d["forward"]["by_kind"] == {
        "all_to_all": {"count": 8, "bytes": halo_bytes},
        "all_reduce": {"count": 6, "bytes": 6 * _STATS * B * 4 * 8},
    }
    assert ex.local_nodes["torch.conv2d"] == 1  # the 1x1 head
    json.dumps(d)  # JSON-ready


@pytest.mark.timeout(120)
def test_two_ranks_rank1_sends_nothing_for_the_downsample():
    rows, _ = _layers(_explain(2, 1))
    # Rank 1 reads row 31 from rank 0 (lo=1) and nobody reads its rows: it joins the
    # all_to_all with an empty buffer.
    assert rows["down"].halo == ((1, 0),) and _kinds(rows["down"]) == ["all_to_all"]
    assert rows["down"].bytes_sent == 0 and rows["down"].collectives[0].received == 2048
    # o = 32..63 read source rows 15.75 .. 31.25: row 15 from rank 0 (lo=1), clamped at the end (hi=0).
    assert rows["up"].halo == ((1, 0),) and rows["up"].bytes_sent == 2048


@pytest.mark.timeout(120)
def test_eight_ranks_interior_and_last_rank():
    rows, norms = _layers(_explain(8, 3))  # 8 local rows of 64
    # An interior rank sends one row to each neighbour: 2 * 1 * 1 * 64 * 4 = 512 B.
    assert rows["enc1"].halo == ((1, 1),) and rows["enc1"].bytes_sent == 2 * W * F32 == 512
    # down: rank r makes outputs 4r..4r+3 from inputs 8r-1 .. 8r+7: rank 3 sends its last
    # row to rank 4 (1 * 8 * 64 * 4 = 2048 B) and receives one from rank 2.
    assert rows["down"].halo == ((1, 0),) and rows["down"].bytes_sent == 2048
    # upsample 32 -> 64 rows: rank 3 holds source rows 12..15 and makes outputs 24..31, which
    # read 11.75 .. 15.25: rows 11 (from rank 2) .. 16 (from rank 4): halo 1/1.  Rank 2's o=23
    # reads row 12 and rank 4's o=32 reads row 15: 2 rows * 16 * 32 * 4 = 4096 B.
    assert rows["up"].halo == ((1, 1),) and rows["up"].bytes_sent == 2 * 16 * 32 * F32 == 4096
    assert all(n.bytes_sent == _STATS * B * 4 * 8 for n in norms)  # does not grow with the rank count

    last, _ = _layers(_explain(8, 7))
    assert last["enc1"].halo == ((1, 1),) and last["enc1"].bytes_sent == 256  # one neighbour only
    assert last["down"].bytes_sent == 0


@pytest.mark.timeout(120)
def test_fused_norms_send_their_statistics_with_the_halo():
    ex = _explain(2, 0, fuse_exchanges=True)
    fused = [r for r in ex.rows if r.kernel == "ops.norm.group_norm_exchange"]
    plain = [r for r in ex.rows if r.kernel == "ops.norm.group_norm"]
    # enc.norm1 -> enc.conv2, enc.norm2 -> down, mid.norm1 -> mid.conv2, mid.norm2 -> the upsample,
    # dec.norm1 -> dec.conv2.  dec.norm2 feeds the 1x1 head (no halo): it keeps its all_reduce.
    assert len(fused) == 5 and len(plain) == 1
    # Each fused exchange carries the halo op's rows (the same rows as without fusion: 2048 B, one row
    # of 8 x 64 for the convs and of 16 x 32 for the upsample, see
    # test_two_ranks_rank0_matches_hand_arithmetic) and this rank's statistics for the other rank:
    # (c, s1, s2) per (sample, group) in fp32, 3 * B(1) * G(4) * 4 B = 48 B.
    assert [r.halo for r in fused] == [((1, 1),), ((1, 0),), ((1, 1),), ((0, 1),), ((1, 1),)]
    halo = [2048] * 5
    assert all(_kinds(r) == ["all_to_all"] for r in fused)
    assert [r.bytes_sent for r in fused] == [b + 3 * B * 4 * F32 for b in halo]
    # The halo ops take their rows from the norm (halo_rows=): no collective of their own.
    takers = [r for r in ex.rows if r.kernel in ("ops.conv.conv", "ops.interpolate.interpolate") and not r.collectives]
    assert len(takers) == 5
    assert ex.graph.code.count("halo_rows = ") == 5
    halo_bytes = 256 + 2048 + 6144  # enc.conv1, mid.conv1, dec.conv1
    d = ex.to_dict()
    assert d["forward"]["by_kind"] == {
        "all_to_all": {"count": 8, "bytes": halo_bytes + sum(halo) + 5 * 48},
        "all_reduce": {"count": 1, "bytes": _STATS * B * 4 * 8},
    }
    # Backward: every exchange but the first conv's (its input needs no gradient) runs once more.
    assert d["backward"]["by_kind"]["all_to_all"]["count"] == 7


@pytest.mark.timeout(120)
def test_world_size_one_is_untouched():
    ex = _explain(1, 0)
    assert ex.rows == [] and ex.forward() == [] and ex.backward() == []
    assert any("unchanged" in n for n in ex.notes)
    assert ex.local_nodes["torch.conv2d"] == 8 and "no node needs a collective" in ex.table
    assert "fxhalo" not in ex.graph.code  # the graph Dynamo captured, as it was


@pytest.mark.timeout(120)
def test_table_and_summary_text():
    ex = _explain(2, 0)
    text = str(ex)
    assert text.startswith(ex.table) and ex.summary in text
    for word in ("node", "op", "source", "halo lo/hi", "edge", "collective", "bytes sent"):
        assert word in ex.table.splitlines()[0]
    assert "fxhalo/models.py:" in ex.table  # the layer's line, although the model lives in fxhalo
    assert "6,144" in ex.table and "local: 8 nodes need no collective" in ex.table
    assert "forward:  14 collectives" in ex.summary
    assert f"backward: {len(ex.backward())} collectives" in ex.summary
    assert "fxhalo.ops.conv.conv" in ex.graph.code or "fxhalo_ops_conv_conv" in ex.graph.code


@pytest.mark.timeout(120)
def test_backward_convention_matches_a_measured_backward():
    """The summary's backward (derived by convention) equals the collectives autograd really runs.

    The rewritten graph runs forward and backward on fake tensors under a fake process
    group, with a dispatch mode counting the functional collectives of the backward.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "c10d" in func.namespace and func._opname != "wait_tensor":
                kind, nbytes = self.seen.get(func._opname, (0, 0))
                self.seen[func._opname] = (kind + 1, nbytes + args[0].numel() * args[0].element_size())
            return func(*args, **(kwargs or {}))

    ex = _explain(4, 1)
    by_kind = ex.to_dict()["backward"]["by_kind"]
    # The first conv's input does not require grad: 7 of the 8 halos run backward.  Each
    # norm's all_reduce runs backward, and so does each gradient sync (a parameter bucket
    # with grad_sync) the backend inserted.
    syncs = [r for r in ex.rows if r.backward and not r.collectives]
    assert by_kind["all_to_all"]["count"] == 7 and by_kind["all_reduce"]["count"] == 6 + len(syncs)

    dist.init_process_group("fake", rank=1, world_size=4)
    try:
        graph = ex.graph
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        mode = placeholders[0].meta["example_value"].fake_mode
        with mode:
            args = [_with_grad(n, n.meta["example_value"]) for n in placeholders]
            out = graph(*args)
            loss = sum(o.sum() for o in out)
            count = Count()
            with count:
                loss.backward()
    finally:
        dist.destroy_process_group()
    assert count.seen == {
        "all_to_all_single": (7, by_kind["all_to_all"]["bytes"]),
        "all_reduce": (6 + len(syncs), by_kind["all_reduce"]["bytes"]),
    }


@pytest.mark.timeout(120)
def test_no_backward_without_grad():
    with torch.no_grad():
        ex = _explain(2, 0)
    assert ex.backward() == [] and "backward" not in ex.summary


class _Refusals(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        # A sort returns a tuple: after its refusal, its values must still count as sharded, so
        # the renorm after it is refused too and the second conv still planned.
        a = torch.sort(self.conv(x), dim=2).values  # SORT-LINE
        b = torch.renorm(a, p=2, dim=0, maxnorm=1.0)  # RENORM-LINE (norms over the sharded dim)
        return self.conv(b)


@pytest.mark.timeout(120)
def test_refusals_are_rows_and_the_rest_is_still_explained():
    ex = fxhalo.explain(_Refusals(), torch.randn(1, 1, 4, 8), world_size=4, rank=1)
    refused = ex.problems
    assert [r.op for r in refused] == ["torch.sort", "torch.renorm"]
    assert refused[0].node == "sort"  # the sort node itself, not its getitem
    assert all("Remedy:" in r.error and "test_explain.py:" in r.source for r in refused)
    # The convs around them are still planned: 2 neighbours * 1 row * 1 * 8 * 4 = 64 B each.
    convs = [r for r in ex.rows if r.op == "torch.conv2d"]
    assert [c.bytes_sent for c in convs] == [64, 64]
    ops = [r.op for r in ex.rows if r.op.startswith("torch.")]  # (not the backend's gradient syncs)
    assert ops == ["torch.conv2d", "torch.sort", "torch.renorm", "torch.conv2d"]
    assert "REFUSED" in ex.table and "problem" in ex.table.splitlines()[0]
    assert "REFUSED: 2 problems" in ex.summary


@pytest.mark.timeout(120)
def test_no_process_group_is_left_behind():
    hook = sys.excepthook
    assert not dist.is_initialized()
    _explain(4, 2)
    assert not dist.is_initialized() and sys.excepthook is hook
    with pytest.raises(fxhalo.FxHaloError, match="world_size"):
        fxhalo.explain(small_unet(), torch.randn(1, 1, 16, 64))
    with pytest.raises(fxhalo.FxHaloError, match="rank 4"):
        fxhalo.explain(small_unet(), torch.randn(1, 1, 16, 64), world_size=4, rank=4)
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_inside_a_group_uses_the_real_rank_and_refuses_other_sizes():
    dist.init_process_group("fake", rank=1, world_size=2)
    try:
        ex = fxhalo.explain(small_unet(), torch.randn(1, 1, 32, 64))
        assert (ex.rank, ex.world_size) == (1, 2)
        assert _layers(ex)[0]["down"].bytes_sent == 0
        with pytest.raises(fxhalo.FxHaloError, match="without a process group"):
            fxhalo.explain(small_unet(), torch.randn(1, 1, 8, 64), world_size=8)
        assert dist.is_initialized()  # the user's group is left alone
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_models_compiled_before_are_not_recompiled():
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    model = small_unet()
    x = torch.randn(1, 1, 16, 64)
    compiled = torch.compile(model, backend=counting)
    compiled(x)
    fxhalo.explain(model, x, world_size=4)
    fxhalo.explain(compiled, x, world_size=4)  # an OptimizedModule: the model inside it is explained
    compiled(x)
    assert len(compiles) == 1


def _only_rank0_explains(rank, world_size):
    import fxhalo
    from fxhalo.models import small_unet

    if rank == 0:
        ex = fxhalo.explain(small_unet(), torch.randn(1, 1, 16, 32))
        out = (ex.rank, ex.world_size, len(ex.forward()))
    else:
        out = None
    dist.barrier()  # rank 1 waits here; a collective inside explain would have paired with it
    t = torch.ones(1)
    dist.all_reduce(t)
    return out, t.item()


@pytest.mark.timeout(200)
def test_one_rank_alone_can_explain_in_a_real_group():
    from tests.harness import run_ranks

    # 9 forward collectives: the default fuses five norms with the next halo op's exchange
    assert run_ranks(_only_rank0_explains, 2, timeout=180) == [((0, 2, 9), 2.0), (None, 2.0)]


# -- the command line and the log ------------------------------------------------------


def _run(args, env=None, timeout=240):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}  # only what the test asks for
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=root, **(env or {}))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=root
    )


@pytest.mark.timeout(300)
def test_cli_explains_a_factory_by_module_and_by_file(tmp_path):
    out = _run(
        [
            "-m",
            "fxhalo",
            "explain",
            "fxhalo.models:small_unet",
            "--input-shape",
            "1,4,64,64",
            "--world-size",
            "4",
            "--rank",
            "1",
            "-k",
            "in_channels=4",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # local input 1 x 4 x 16 x 64; enc.conv1 sends 1 row to each neighbour: 2 * 4 * 64 * 4 = 2,048 B
    assert "local input (1, 4, 16, 64) on rank 1 of 4" in out.stdout
    assert "rank 1 of 4, shard_dim 2" in out.stdout and "2,048" in out.stdout

    out = _run(
        [
            "-m",
            "fxhalo",
            "explain",
            "tests/models.py:small_unet",
            "--input-shape",
            "1,1,64,64",
            "--world-size",
            "2",
            "--json",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout)
    first_conv = next(r for r in d["rows"] if r["op"] == "torch.conv2d")
    assert d["world_size"] == 2 and first_conv["bytes_sent"] == 256 and first_conv["halo"] == [[1, 1]]

    model_file = tmp_path / "refused_model.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch

        class M(torch.nn.Module):
            def forward(self, x):
                return torch.sort(x, dim=2).values
    """)
    )
    out = _run(["-m", "fxhalo", "explain", f"{model_file}:M", "--input-shape", "1,1,8,8", "--world-size", "2"])
    assert out.returncode == 1 and "REFUSED" in out.stdout and "refused_model.py:6" in out.stdout


_LOGGED = """
import torch, torch.distributed as dist, fxhalo
from fxhalo.models import small_unet
dist.init_process_group("fake", rank=int(__import__("sys").argv[1]), world_size=2)
try:  # the log is written at compile time; the fake group cannot run every all_to_all afterwards
    torch.compile(small_unet(), backend="domain_parallel", options={"compiler": "eager"})(torch.randn(1, 1, 16, 32))
except RuntimeError:
    pass
dist.destroy_process_group()
print("done")
"""


@pytest.mark.timeout(300)
def test_torch_logs_shows_the_rewritten_graph_on_rank0(tmp_path):
    script = tmp_path / "logged.py"
    script.write_text(_LOGGED)
    out = _run([str(script), "0"], env={"TORCH_LOGS": "+fxhalo"})
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]
    assert "fxhalo rewrote graph" in out.stderr and "class GraphModule" in out.stderr
    assert "halo lo/hi" in out.stderr and "forward:  9 collectives" in out.stderr  # fused norms

    info = _run([str(script), "0"], env={"TORCH_LOGS": "fxhalo"})  # INFO: one line per graph
    assert "fxhalo rewrote graph" in info.stderr and "halo lo/hi" not in info.stderr

    for args, env in (([str(script), "1"], {"TORCH_LOGS": "+fxhalo"}), ([str(script), "0"], {})):
        quiet = _run(args, env=env)  # rank 1, or the log off: nothing
        assert quiet.returncode == 0 and "fxhalo rewrote" not in quiet.stderr


@pytest.mark.timeout(120)
def test_the_docs_example_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "inspecting.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "docs/inspecting.md", "exec"), {})
    printed = capsys.readouterr().out
    # rank 1's first conv: 2 neighbours * 1 row * 4 channels * 128 columns * 4 B, as the docs say
    assert "rank 1 of 4" in printed and "4,096" in printed
    assert not dist.is_initialized()


def test_global_view_explains_a_field_of_any_size_with_no_memory():
    """Global (meta) inputs: the UNet on a 721-row ERA5 grid over 16 ranks, and a bottleneck too short to
    shard on 4 ranks, whose gather and re-slice show as rows with their bytes."""
    from fxhalo.models import SkipUNet

    model = SkipUNet(c=2, width=2, depth=4)
    ex = fxhalo.explain(model, torch.empty(1, 2, 721, 1440, device="meta"), world_size=16, rank=3, global_view=True)
    assert not ex.problems and ex.rows
    small = fxhalo.explain(model, torch.empty(1, 2, 45, 16, device="meta"), world_size=4, rank=3, global_view=True)
    ops = {r.op: r for r in small.rows}
    assert ops["ops.moves.all_rows"].collectives[0].kind == "all_gather"
    assert ops["ops.moves.all_rows"].collectives[0].bytes > 0
    assert "ops.moves.own_rows" in ops
    uneven = fxhalo.explain(
        model, torch.empty(1, 2, 45, 16, device="meta"), world_size=4, global_view=True, partition=(10, 3, 12, 20)
    )
    assert not uneven.problems


@pytest.mark.timeout(120)
def test_moves_of_the_shard_show_their_analytic_minimum():
    """An FNO layer's two FFT moves and attention by heads send exactly the minimum the partitions give
    (a rank's slab less the piece it keeps); the attention's q, k and v travel in one all_to_all."""
    from tests.beyond_models import FNOBlock, TokenAttention

    torch.manual_seed(0)
    x = torch.randn(1, 8, 64, 64, device="meta")
    ex = fxhalo.explain(FNOBlock(8, 4, 4), x, world_size=2, rank=0, global_view=True)
    moves = [r for r in ex.rows if r.minimum is not None]
    assert [r.op for r in moves] == ["torch._C._fft.fft_rfft2", "torch._C._fft.fft_irfft2"]
    assert all(r.bytes_sent == r.minimum > 0 for r in moves) and "move minimum" in ex.table
    assert "(1.00x)" in ex.table
    ex = fxhalo.explain(
        TokenAttention(32, 4), torch.randn(1, 32, 63, 8, device="meta"), world_size=3, rank=1, global_view=True
    )
    (attn,) = [r for r in ex.rows if r.minimum is not None]
    assert attn.bytes_sent == attn.minimum and [c.kind for c in attn.collectives] == ["all_to_all"] * 2


@pytest.mark.timeout(120)
def test_a_chain_of_products_contracting_the_shard_costs_one_sum():
    """A product that contracts the shard leaves partial sums: a chain of linear ops sums once (all-reduce of
    the smallest tensor), and a partial sum that meets sharded rows is reduce-scattered, at the minimum."""
    from tests.beyond_models import ContractChain, ContractScatter

    x = torch.randn(2, 3, 19, device="meta")
    for model, kernel, kind in (
        (ContractChain(19), "ops.moves.sum_partial", "all_reduce"),  # of one number
        (ContractScatter(19), "ops.moves.scatter_partial", "all_to_all"),
    ):
        ex = fxhalo.explain(model, x, world_size=3, rank=1, global_view=True)
        sending = [r for r in ex.rows if r.collectives]
        assert [r.op for r in sending] == [kernel] and [c.kind for c in sending[0].collectives] == [kind]
    assert sending[0].bytes_sent == sending[0].minimum == 2 * 3 * (19 - 6) * 4  # all rows but its own 6


def _mesh_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 1, 3, padding=1)
    )


@pytest.mark.timeout(120)
def test_a_mesh_reports_each_axis_and_the_minimum():
    """On a 2 x 2 mesh (no process group: torch's fake one), rank 3's 8 x 6 block of a 2-channel field.
    A 3x3 conv with zero padding needs 1 row of 6 columns from its H neighbour (rank 1), 1 column of 8 rows
    from its W neighbour (rank 2) and the corner value from rank 0, in one all_to_all over the whole domain;
    it sends as much (the neighbours' blocks are as large); the zero padding past the global edges is
    never sent.  The GroupNorm sums over the whole domain (unfused here; fused below)."""
    hook = sys.excepthook
    ex = fxhalo.explain(
        _mesh_model(), torch.randn(1, 2, 8, 6), world_size=(2, 2), rank=3, shard_dim=(2, 3), fuse_exchanges=False
    )
    assert not dist.is_initialized() and sys.excepthook is hook
    assert (ex.world_size, ex.rank, ex.shard_dim) == ((2, 2), 3, (2, 3))
    conv1, norm, conv2 = [r for r in ex.rows if r.op != "ops.grad.synced_params"]
    assert conv1.shard_dim == (2, 3) and conv1.halo == ((1, 1), (1, 1))
    row, column, corner = 1 * 2 * 6 * 4, 8 * 2 * 1 * 4, 2 * 4  # 2 channels, fp32
    assert [(c.kind, c.axis, c.bytes) for c in conv1.collectives] == [("all_to_all", "whole", row + column + corner)]
    assert [(c.kind, c.axis) for c in norm.collectives] == [("all_reduce", "whole")]
    assert "all_to_all[whole]" in ex.table and "rank 3 of 2 x 2 mesh" in ex.summary
    assert "along whole:" in ex.summary
    assert json.dumps(ex.to_dict())  # the axes travel in the JSON too


@pytest.mark.timeout(120)
def test_on_a_mesh_a_norm_sends_its_statistics_with_the_next_blocks_halo():
    """The same model with the default fusion: the GroupNorm's statistics and the second conv's block
    halo (4 channels now: a row of 6, a column of 8 and the corner) go in one all_to_all over the whole
    domain, and the conv sends nothing.  Statistics: (c, s1, s2) per (sample, group) in fp32 to each of
    the 3 other ranks: 3 * 1 * 2 * 4 B * 3."""
    ex = fxhalo.explain(_mesh_model(), torch.randn(1, 2, 8, 6), world_size=(2, 2), rank=3, shard_dim=(2, 3))
    conv1, norm, conv2 = [r for r in ex.rows if r.op != "ops.grad.synced_params"]
    assert norm.kernel == "ops.norm.group_norm_exchange" and not conv2.collectives
    halo = (1 * 4 * 6 + 8 * 4 * 1 + 4) * 4
    assert [(c.kind, c.axis, c.bytes) for c in norm.collectives] == [("all_to_all", "whole", halo + 3 * 2 * 4 * 3)]
    assert len(ex.forward()) == 2  # was 3: the conv's halo, the norm's sum, the next conv's halo

    small = fxhalo.explain(small_unet(), torch.randn(1, 1, 32, 32), world_size=(2, 2), shard_dim=(2, 3))
    # 14 forward collectives unfused; the five norms that feed a conv or the upsample now ride with its halo
    assert [r.kernel for r in small.rows].count("ops.norm.group_norm_exchange") == 5
    assert len(small.forward()) == 9


@pytest.mark.timeout(120)
def test_a_mesh_needs_its_shape_and_a_real_mesh_is_used_inside_a_group():
    from torch.distributed.device_mesh import init_device_mesh

    x = torch.randn(1, 2, 8, 6)
    with pytest.raises(fxhalo.FxHaloError, match=r"world_size=\(2, 2\)"):
        fxhalo.explain(_mesh_model(), x, world_size=4, shard_dim=(2, 3))
    with pytest.raises(fxhalo.FxHaloError, match="rank 4"):
        fxhalo.explain(_mesh_model(), x, world_size=(2, 2), rank=4, shard_dim=(2, 3))
    dist.init_process_group("fake", rank=2, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("lat", "lon"))
        ex = fxhalo.explain(_mesh_model(), x, group=mesh, shard_dim=(2, 3))
        assert (ex.world_size, ex.rank) == ((2, 2), 2)
        assert {c.axis for r in ex.rows for c in r.collectives} == {"whole"}
        lines = fxhalo.explain(nn.Conv2d(2, 2, (3, 1), padding=(1, 0)), x, group=mesh, shard_dim=(2, 3))
        assert [c.axis for r in lines.rows for c in r.collectives] == ["lat"]  # a halo along H only
        with pytest.raises(fxhalo.FxHaloError, match="describes this process"):
            fxhalo.explain(_mesh_model(), x, group=mesh, shard_dim=(2, 3), world_size=(4, 1))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_validate_on_a_mesh_reports_per_axis():
    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 9, padding=4)

        def forward(self, x):
            # H and W merged into one dim on plain blocks: refused (two mesh axes on one dim)
            return self.conv(x).flatten(2).softmax(-1)

    problems = fxhalo.validate(Wide(), torch.randn(1, 1, 3, 16), world_size=(2, 2), rank=1, shard_dim=(2, 3))
    kinds = sorted((p.kind, p.op.split("'")[1]) for p in problems)
    assert [k for k, _ in kinds] == ["refused", "wide halo"], problems
    wide = next(p for p in problems if p.kind == "wide halo")
    assert "4 rows along dim 2, wider than the 3-row shards" in wide.message  # W's 16 columns are wide enough
    refused = next(p for p in problems if p.kind == "refused")
    assert "two mesh axes would shard along one dim" in refused.message
    assert fxhalo.validate(_mesh_model(), torch.randn(1, 2, 8, 6), world_size=(2, 3), rank=5, shard_dim=(2, 3)) == []
    with pytest.raises(fxhalo.FxHaloError, match="world_size"):
        fxhalo.validate(_mesh_model(), torch.randn(1, 2, 8, 6), world_size=6, shard_dim=(2, 3))


@pytest.mark.timeout(120)
def test_cli_explains_a_block_of_a_mesh(capsys):
    """``--world-size 2x2 --shard-dim 2,3``: rank 3's 8 x 6 block of a 16 x 12 field; the first conv (1
    channel, fp32) sends its H neighbour a row of 6 (24 B), its W neighbour a column of 8 (32 B) and the
    corner (4 B) in one all_to_all over the whole domain.  A dim count that differs from the mesh's axes
    exits with status 2 and says so."""
    from fxhalo.__main__ import main

    argv = ["explain", "fxhalo.models:small_unet", "--input-shape", "1,1,16,12", "--world-size", "2x2"]
    assert main([*argv, "--shard-dim", "2,3", "--rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "local input (1, 1, 8, 6) on rank 3 of 2x2" in out and "rank 3 of 2 x 2 mesh" in out
    conv = next(line for line in out.splitlines() if line.startswith("conv2d "))
    assert "all_to_all[whole]" in conv and conv.split()[-1] == "60", conv
    assert not dist.is_initialized()
    assert main([*argv, "--shard-dim", "2"]) == 2
    assert "names 1 dims for a mesh of 2 axes" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_many_explains_of_torch_modules_in_one_process_each_see_their_graph():
    """Dynamo wraps a torch module's forward, as the top frame, in one shared ``inner`` code object with one
    recompile limit (8): the ninth explain of an ``nn.Conv2d`` with new guards ran eagerly and reported no
    collective at all (fxhalo.tracing._own_frame)."""
    seen = []
    for w in range(4, 16):
        ex = fxhalo.explain(nn.Conv2d(2, 2, 3, padding=1), torch.randn(1, 2, 8, w), world_size=2, rank=0)
        seen.append(len(ex.forward()))
    assert seen == [1] * 12, seen
