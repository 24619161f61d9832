"""Every spelling the local rules register, one by one, on a hand-built graph (one process).

The elementwise table of ``fxhalo/rules/local.py`` registers a few hundred targets
(``torch.X``, ``F.X``, ``torch.special.X``, ``Tensor.X``, in-place ``X_``, the
``operator`` functions).  Each is called here on real tensors to get its output, put
in a one-node FX graph whose tensor inputs are sharded along dim 2 (a simulated 4-rank
domain), and propagated: the output must be sharded like the
inputs, and the node must stay as it is (no kernel call).
"""

from __future__ import annotations

import operator

import pytest
import torch

from fxhalo import Domain
from fxhalo.layout import Sharded, sharding_of
from fxhalo.passes import PassContext, propagate_sharding
from fxhalo.rules import all_rules, decision_of
from fxhalo.rules.local import Elementwise

SHAPE = (2, 3, 8, 6)

#: every target the elementwise rule holds: (op, target), op 'call_function' or 'call_method'
ELEMENTWISE_TARGETS = sorted(
    ((op, t) for (op, t), rule in all_rules().items() if isinstance(rule, Elementwise)),
    key=lambda k: (k[0], k[1] if isinstance(k[1], str) else f"{k[1].__module__}.{k[1].__name__}"),
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.rand(SHAPE, generator=g) + 0.5 for _ in range(3))
    mask = torch.rand(SHAPE, generator=g) > 0.5
    return x, y, z, mask


def _candidates(x, y, z, mask):
    """Argument lists to try, in order: the first one the op accepts (returning x's shape) is used."""
    xb, yb = x > 1, y > 1
    return [
        (x,),
        (x, y),
        (x, y, z),
        (x, 1.0),
        (x, 0.5, True),
        (x[0], 0.5, True),
        (x, -1.0, 1.0),
        (x, y, 0.5),
        (mask, x, y),
        (x, mask, 0.0),
        (x, torch.float64),
        (xb,),
        (xb, yb),
        (torch.complex(x, y),),  # the complex parts (Tensor.real/imag)
    ]


def _call(op: str, target, args):
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # in-place ops write here
    if op == "call_method":
        return getattr(args[0], target)(*args[1:])
    return target(*args)


def _working_args(op: str, target):
    for args in _candidates(*_tensors()):
        try:
            out = _call(op, target, args)
        except Exception:  # noqa: BLE001 - not this op's arity or dtype; try the next
            continue
        if isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            return args, out
    return None, None


def _one_node_graph(op: str, target, args, out):
    graph = torch.fx.Graph()
    nodes = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            ph = graph.placeholder(f"t{i}")
            ph.meta["val"] = a
            nodes.append(ph)
        else:
            nodes.append(a)
    call = graph.create_node(op, target, tuple(nodes))
    call.meta["val"] = out
    graph.output(call)
    return torch.fx.GraphModule(torch.nn.Module(), graph), call


def _label(key):
    op, t = key
    return f"Tensor.{t}" if op == "call_method" else f"{t.__module__}.{t.__name__}"


def test_the_table_is_registered_under_every_spelling():
    names = {_label(k) for k in ELEMENTWISE_TARGETS}
    for spelled in ("torch.relu", "torch.relu_", "Tensor.relu_", "torch._C._nn.gelu", "Tensor.add_"):
        assert spelled in names, spelled
    assert ("call_function", operator.iadd) in ELEMENTWISE_TARGETS


@pytest.mark.parametrize("key", ELEMENTWISE_TARGETS, ids=_label)
def test_every_elementwise_spelling_is_local_and_keeps_the_layout(key):
    op, target = key
    args, out = _working_args(op, target)
    if args is None:
        pytest.skip(f"{_label(key)}: no argument list of the table runs it on a {SHAPE} tensor")
    gm, call = _one_node_graph(op, target, args, out)
    propagate_sharding(gm, PassContext(Domain("sim", 1, 4, 2)))
    rows = out.shape[2]
    assert sharding_of(call) == Sharded(2, rows, 4 * rows)
    assert isinstance(decision_of(call).rule, Elementwise) and not decision_of(call).rewrites
