"""The rewrite: each rule replaces its nodes with calls to the shared kernels in :mod:`fxhalo.ops`.

Before::

    conv2d = torch.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)

After::

    conv2d = fxhalo.ops.conv.conv(x, w, b, (1, 1), (1, 1), (1, 1), 1,
                                  shard_dim=2, group_name='0', edge_mode='zeros', ...)
"""

from __future__ import annotations

import torch

from ..errors import FxHaloError, describe_node
from .context import PassContext
from .sharding import RULE


def rewrite(gm: torch.fx.GraphModule, ctx: PassContext) -> int:
    """Apply every rule's rewrite; returns the number of nodes replaced."""
    changed = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        rule = node.meta.get(RULE)  # the rule propagation used: the op's own, or the fallback
        if rule is None:
            continue
        try:
            changed += bool(rule.rewrite(node, ctx))
        except FxHaloError:
            raise
        except Exception as e:  # a bug in a rule: say which node it was working on
            raise FxHaloError(f"fxhalo failed while rewriting {describe_node(node)}: {e}") from e
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
