"""Layouts that cross graph breaks.

Dynamo splits a model at a graph break into several graphs; values computed by
one graph arrive at the next as inputs, where the input rule alone would have
to guess their layout (a replicated ``(B, C, 1, 1)`` global mean looks like a
sharded activation).  Each compiled graph therefore records the layout of the
tensors it returns, keyed by the tensor objects themselves (weakly), and the
backend compiling a later graph looks its example inputs up here first.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree

from ..layout import layout_of as node_layout

# id(tensor) -> (weak reference, layout).  Not a WeakKeyDictionary: that compares live
# keys with ==, which for tensors is elementwise.
_LAYOUTS: dict[int, tuple[weakref.ref, object]] = {}


def _remember(value: torch.Tensor, layout) -> None:
    key = id(value)
    _LAYOUTS[key] = (weakref.ref(value, lambda _, key=key: _LAYOUTS.pop(key, None)), layout)


def layout_of(value) -> tuple[bool, object]:
    """``(known, layout)`` of a tensor returned by an earlier compiled graph."""
    entry = _LAYOUTS.get(id(value))
    if entry is not None and entry[0]() is value:
        return True, entry[1]
    return False, None


def known(gm: torch.fx.GraphModule, example_inputs) -> dict[str, object]:
    """Layouts of placeholders whose example input was produced by an earlier graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for node, value in zip(placeholders, example_inputs):
        hit, layout = layout_of(value)
        if hit:
            found[node.name] = layout
    return found


def recording(compiled, gm: torch.fx.GraphModule):
    """Wrap ``compiled`` so that the tensors it returns carry their layouts to later graphs."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    layouts = [node_layout(leaf) for leaf in pytree.tree_leaves(output.args[0])]

    def remember(outs):
        for value, layout in zip(pytree.tree_leaves(outs), layouts):
            if isinstance(value, torch.Tensor):
                _remember(value, layout)
        return outs

    def run(*args):  # Dynamo calls what a backend returns with the graph's inputs as arguments
        return remember(compiled(*args))

    return run
