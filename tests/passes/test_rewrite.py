"""The passes on real Dynamo graphs, in one process, with a simulated 4-rank domain.

Propagation and rewrite need no process group (a Domain is plain data), so they
can be unit-tested without spawning ranks: capture Dynamo's graph with a
recording backend, run the passes, count nodes, lint.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxhalo import FxHaloError
from fxhalo.layout import Sharded, sharding_of
from fxhalo.ops import conv as conv_ops
from tests.models import WindowConvBlock
from tests.passes.graphs import Lambda, passes_on, targets


def test_3x3_conv_becomes_the_halo_kernel_and_1x1_stays():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm, changed = passes_on(m, torch.randn(1, 2, 8, 8))
    assert changed == 1
    t = targets(gm)
    assert t.count(conv_ops.conv) == 1 and t.count(torch.conv2d) == 1
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) == Sharded(2, 8, 32)


def test_patchify_conv_is_proven_local():
    gm, changed = passes_on(nn.Conv2d(3, 8, 4, stride=4), torch.randn(1, 3, 8, 8))
    assert changed == 0
    conv = next(n for n in gm.graph.nodes if n.target is torch.conv2d)
    assert sharding_of(conv) == Sharded(2, 2, 8)


def test_padding_mode_pad_is_folded_and_keeps_the_other_dims():
    gm, changed = passes_on(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), torch.randn(1, 1, 8, 8))
    assert changed == 1
    pads = [n for n in gm.graph.nodes if n.target is torch._C._nn.pad]
    assert len(pads) == 1 and list(pads[0].args[1]) == [1, 1, 0, 0]  # W only; H is in the halo
    kernel = next(n for n in gm.graph.nodes if n.target is conv_ops.conv)
    assert kernel.kwargs["edge_mode"] == "circular" and kernel.kwargs["edge_extent"] == (1, 1)


def test_pad_along_w_only_stays_local():
    class M(nn.Module):
        def forward(self, x):
            return F.pad(x, (2, 2, 0, 0), mode="circular") + 1

    assert passes_on(M(), torch.randn(1, 1, 8, 8))[1] == 0


def test_replicated_override_makes_an_input_local():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, static):
            return self.conv(x) + torch.sort(self.conv(static), dim=2).values.sum()

    with pytest.raises(FxHaloError, match="torch.sort"):  # static would be sharded by default
        passes_on(M(), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8))
    gm, changed = passes_on(M(), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), static=None)
    assert changed == 1
    placeholders = {n.name: sharding_of(n) for n in gm.graph.nodes if n.op == "placeholder"}
    assert placeholders["l_static_"] is None and placeholders["l_x_"] == Sharded(2, 8, 32)


def test_unknown_op_on_a_sharded_value_is_refused():
    class M(nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=2).values

    with pytest.raises(FxHaloError, match=r"sort.*no rule"):
        passes_on(M(), torch.randn(1, 1, 8, 8))


def test_unknown_op_on_replicated_values_is_fine():
    class M(nn.Module):
        def forward(self, x, y):
            return x + torch.fft.fft(y).real.sum()

    assert passes_on(M(), torch.randn(1, 1, 8, 8), torch.randn(3))[1] == 0


def test_convs_on_windows_whose_shard_sits_in_the_batch_dim_are_local():
    """A conv never mixes batch entries: an interleaved shard in the batch dim is local for it; so is
    attention inside each window."""
    gm, changed = passes_on(WindowConvBlock(), torch.randn(2, 4, 8, 8))
    assert changed == 0
    convs = [n for n in gm.graph.nodes if n.target is torch.conv2d]
    assert len(convs) == 2 and all(sharding_of(c).dim == 0 and not sharding_of(c).contiguous for c in convs)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert sharding_of(out) == Sharded(2, 8, 32)


def test_attention_along_the_sharded_sequence_dim_gathers_the_keys_and_the_embedding_is_refused():
    from fxhalo.ops import attention

    def attend(x):  # (B, L, E) with L sharded: no head dim, so the keys are gathered
        return F.scaled_dot_product_attention(x, x, x)

    gm, changed = passes_on(Lambda(attend), torch.randn(2, 8, 4), shard_dim=1)
    assert changed == 1 and attention.sdpa_by_gathered_keys in targets(gm)
    with pytest.raises(FxHaloError, match="embedding dim 2 sharded.*Remedy"):
        passes_on(Lambda(attend), torch.randn(2, 8, 4), shard_dim=2)
