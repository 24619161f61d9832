"""The rewrite: every node whose decision carries a kernel call is replaced by that call.

Before::

    conv2d = torch.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)

After::

    conv2d = fxhalo.ops.conv.conv(x, w, b, (1, 1), (1, 1), (1, 1), 1,
                                  edge_mode='zeros', ..., axes=(ShardAxis(2, '0', 64),))

The call is built from the node's arguments at this point (``Decision.call``), so an
op right after a rewritten node reads the new node.
"""

from __future__ import annotations

import torch

from ..errors import FxHaloError, describe_node
from ..rules import decision_of, replace_node
from .context import PassContext


def rewrite(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Replace every node whose decision rewrites it; returns the number of nodes replaced."""
    changed = 0
    for node in list(gm.graph.nodes):
        decision = decision_of(node)
        if decision is None or not decision.rewrites:
            continue
        try:
            replace_node(node, decision.call(node), ctx, decision.layout)
        except FxHaloError:
            raise
        except Exception as e:  # a bug in a rule: say which node it was working on
            raise FxHaloError(f"fxhalo failed while rewriting {describe_node(node)}: {e}") from e
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
