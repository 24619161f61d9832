"""Keep ``meta['val']`` / ``meta['example_value']`` true after the rewrite.

Dynamo traced the model on the local slab as if it were the whole tensor, so
shapes downstream of a rewritten op (a ``'valid'`` conv, say) may be stale.
Re-running the graph on fake tensors refreshes them and checks that the rewritten
graph is well-formed before it is compiled.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import FxHaloError


def refresh_meta(gm: torch.fx.GraphModule, example_inputs) -> int:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_args = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    # Dynamo hands the backend a fresh fake mode; the placeholders' values belong to
    # the mode Dynamo traced with, and only that one can run on them.
    modes = [a.fake_mode for a in fake_args if isinstance(a, FakeTensor)]
    fake_mode = modes[0] if modes else detect_fake_mode(example_inputs)
    if fake_mode is None:
        return 0
    try:
        with fake_mode:
            FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*fake_args)
    except FxHaloError:
        raise
    except Exception as e:
        raise FxHaloError(
            f"the rewritten graph does not run on the local shapes: {e}. This usually means an op "
            "after a rewritten one assumed the unsharded sizes (e.g. a view with fixed sizes)."
        ) from e
    for n in gm.graph.nodes:
        if "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]
    return len(gm.graph.nodes)
