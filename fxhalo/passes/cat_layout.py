"""Give a halo's ``cat`` the memory format of the convolution that reads it (an Inductor pass).

Why.  A halo op's input is ``cat([rows from below, own rows, rows from above], dim)``.
Inductor runs convolutions channels-last whenever it turns on its layout optimisation
(always on CPU with oneDNN).  Its ``cat`` lowering picks the output's strides before it
knows the reader: contiguous (NCHW) unless one input is an already realised
channels-last buffer, or, when no input is realised, one input's example value is
channels-last.  After a norm the own rows are not realised (the normalisation and the
activation are fused into the ``cat``), so the ``cat`` came out NCHW and the
convolution copied it to channels-last again: one more pass over the whole shard, and
the fused normalisation ran as a scalar loop (it read channels-last, wrote NCHW).
Profiled on SmallUNet 256² on 2 ranks, those kernels took 76 ms of a step against
32 ms for the same rows in one process (``docs/performance.md``).

What.  For every ``aten.cat`` whose result is a convolution's input, on a graph where
Inductor will lay convolutions out channels-last (its own
``GraphLowering.decide_layout_opt``), each input of the ``cat`` goes through
``aten.clone(memory_format=channels_last)``.  Inductor lowers a clone to a pointwise
read that it computes straight into the ``cat``'s buffer, so the clones cost nothing;
their example values are channels-last, which makes the ``cat``'s buffer channels-last
(the second rule above), the layout the convolution wants.  Values are unchanged; only
strides move.  Applied to the forward and the backward graph alike, after Inductor's
own post-grad passes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass, get_hash_for_files

__all__ = ["ChannelsLastCats", "channels_last_cats"]

aten = torch.ops.aten

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _reads_as_conv_input(cat: torch.fx.Node) -> bool:
    return any(u.target is aten.convolution.default and u.args[0] is cat for u in cat.users)


def _format_for(cat: torch.fx.Node) -> torch.memory_format | None:
    """The channels-last format of ``cat``'s result, or None when it has none or already is."""
    val = cat.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() not in _FORMATS:
        return None
    fmt = _FORMATS[val.dim()]
    if val.is_contiguous(memory_format=fmt) and not val.is_contiguous():
        return None
    return fmt


def channels_last_cats(graph: torch.fx.Graph, is_inference: bool) -> int:
    """Clone every input of a ``cat`` read by a convolution to channels-last; returns how many cats."""
    from torch._inductor.graph import GraphLowering

    if not GraphLowering.decide_layout_opt(SimpleNamespace(graph=graph), is_inference=is_inference):
        return 0
    changed = 0
    for cat in list(graph.nodes):
        if cat.target is not aten.cat.default or not _reads_as_conv_input(cat):
            continue
        fmt = _format_for(cat)
        if fmt is None:
            continue
        parts = cat.args[0]
        clones = []
        for part in parts:
            with graph.inserting_before(cat):
                clone = graph.call_function(aten.clone.default, (part,), {"memory_format": fmt})
            val = part.meta.get("val")
            if isinstance(val, torch.Tensor):
                clone.meta["val"] = val.clone(memory_format=fmt)
            clones.append(clone)
        cat.args = (clones, *cat.args[1:])
        changed += 1
    return changed


class ChannelsLastCats(CustomInferenceAwareGraphPass):
    """:func:`channels_last_cats` as Inductor's ``post_grad_custom_post_pass``."""

    def __call__(self, graph: torch.fx.Graph, is_inference: bool) -> None:
        channels_last_cats(graph, is_inference)

    def uuid(self):
        return get_hash_for_files((__file__,))
