"""Ranks agree on the rewrite before any collective runs.

Each rank summarises what it compiled (input local shapes, and the sequence of
inserted kernels with their settings) or the error it hit.  One small
``all_gather_object`` over the domain group shows every rank everybody's
summary, so either all ranks go on with the same collectives, or all raise the
same :class:`FxHaloError`.  No rank is left waiting inside a collective that the
others never call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..domain import Domain
from ..errors import FxHaloError
from ..sharding import example_value, sharding_of


def _shape(arg) -> str:
    val = example_value(arg) if hasattr(arg, "meta") else None
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) else type(val).__name__


def fingerprint(gm: torch.fx.GraphModule) -> list[str]:
    """What this rank compiled: input local shapes and layouts, then every inserted kernel
    (each of which runs the graph's collectives) with its settings and input shapes."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out.append(f"input {n.name} {_shape(n)} {sharding_of(n) or 'replicated'}")
        elif n.op == "call_function" and getattr(n.target, "__module__", "").startswith("fxhalo."):
            shapes = [_shape(a) for a in n.all_input_nodes]
            out.append(f"{n.target.__module__}.{n.target.__name__} {n.name} {shapes} {sorted(n.kwargs.items())}")
    return out


def check_agreement(domain: Domain, summary: list[str] | None, error: BaseException | None) -> None:
    """Raise the same FxHaloError on every rank if any rank failed or the ranks' graphs differ."""
    mine = {"error": f"{type(error).__name__}: {error}" if error is not None else None, "summary": summary}
    everyone: list = [None] * domain.size
    dist.all_gather_object(everyone, mine, group=domain.process_group)
    if isinstance(error, FxHaloError):
        raise error
    if error is not None:
        raise FxHaloError(f"fxhalo could not compile this graph: {type(error).__name__}: {error}") from error
    for r, theirs in enumerate(everyone):
        if theirs["error"] is not None:
            raise FxHaloError(f"rank {r} could not compile this graph, so no rank will run it: {theirs['error']}")
    reference = everyone[0]["summary"]
    for r, theirs in enumerate(everyone[1:], start=1):
        if theirs["summary"] != reference:
            a, b = reference, theirs["summary"]
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first = a[i] if i < len(a) else "<end of graph>"
            second = b[i] if i < len(b) else "<end of graph>"
            raise FxHaloError(
                f"ranks compiled different graphs, which would hang the job. First difference, at "
                f"entry {i}: rank 0 has '{first}', rank {r} has '{second}'. Every rank must see the same "
                "local shapes (equal shards) and take the same graph breaks."
            )
