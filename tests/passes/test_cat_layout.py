"""fxhalo.passes.cat_layout on aten graphs traced with fake tensors (the form Inductor's post-grad passes see).

A ``cat`` read by a convolution gets its inputs cloned to channels-last, so that Inductor lays
the ``cat``'s buffer out as the convolution reads it; values do not change.  Other ``cat``\\ s,
and graphs on which Inductor would not use channels-last, are left alone.  The whole effect,
in Inductor's code, is measured in docs/performance.md; tests/distributed/test_inductor.py
checks that the backend applies the pass and stays exact.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxhalo.passes.cat_layout import channels_last_cats

aten = torch.ops.aten


def _halo_conv(lo, x, hi, w):
    return F.conv2d(torch.cat([lo, F.gelu(x), hi], 2), w, padding=(0, 1))


def _halo_sum(lo, x, hi, w):
    return torch.cat([lo, x, hi], 2).sum() + w.sum()


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 1, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 1, 8), torch.randn(3, 4, 3, 3)


def _clones(gm):
    return [n for n in gm.graph.nodes if n.target is aten.clone.default]


@pytest.mark.timeout(120)
def test_a_cat_read_by_a_conv_is_built_channels_last_with_the_same_values():
    args = _inputs()
    gm = make_fx(_halo_conv, tracing_mode="fake")(*args)
    want = gm(*args)
    assert channels_last_cats(gm.graph, is_inference=False) == 1
    gm.recompile()
    clones = _clones(gm)
    assert len(clones) == 3
    assert all(c.kwargs["memory_format"] is torch.channels_last for c in clones)
    assert all(c.meta["val"].is_contiguous(memory_format=torch.channels_last) for c in clones)
    (cat,) = [n for n in gm.graph.nodes if n.target is aten.cat.default]
    assert list(cat.args[0]) == clones
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_a_cat_no_conv_reads_is_left_alone():
    gm = make_fx(_halo_sum, tracing_mode="fake")(*_inputs())
    assert channels_last_cats(gm.graph, is_inference=False) == 0
    assert not _clones(gm)


@pytest.mark.timeout(120)
def test_without_inductors_channels_last_the_graph_is_left_alone(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "layout_optimization", False)
    gm = make_fx(_halo_conv, tracing_mode="fake")(*_inputs())
    assert channels_last_cats(gm.graph, is_inference=False) == 0
    assert not _clones(gm)
