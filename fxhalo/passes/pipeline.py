"""The backend's passes, in order, and the one runner of them.

The backend (:func:`fxhalo.backend.transform`), :func:`fxhalo.explain` and
:func:`fxhalo.validate` all run :func:`run_pipeline`, so that what the tools
describe is what the backend compiles.

Each pass is ``(name, function)``; the function takes
``(gm, example_inputs, ctx, problems)``, edits ``gm`` in place and returns a count
of what it changed.  With ``TORCH_LOGS="+fxhalo"`` the runner logs each pass's
name, time and node counts; after each pass it checks that ``gm`` is still a
well-formed GraphModule.
"""

from __future__ import annotations

import logging
import time

import torch

from .boundary import wrap_replicated_boundaries
from .context import PassContext
from .fuse import fold_pads, fuse_norm_exchanges
from .localize import localize
from .meta import refresh_meta
from .propagate import propagate_sharding
from .rewrite import rewrite

__all__ = ["PASSES", "run_pipeline"]

log = logging.getLogger(__name__)


def _propagate(gm, example_inputs, ctx: PassContext, problems):
    # A refused node gets no decision, so the rewrite leaves it as written.
    if ctx.global_view:  # traced at global shapes: decide and make the graph local in one walk
        return localize(gm, ctx, problems=problems)
    return propagate_sharding(gm, ctx, problems=problems)


def _rewrite(gm, example_inputs, ctx: PassContext, problems):
    return rewrite(gm, ctx)


# The two fusions plan one axis's exchange; on a mesh of several axes the ops keep exchanging on their own.


def _fold_pads(gm, example_inputs, ctx: PassContext, problems):
    return 0 if ctx.on_mesh else fold_pads(gm, ctx)


def _fuse_norms(gm, example_inputs, ctx: PassContext, problems):
    return fuse_norm_exchanges(gm, ctx) if ctx.fuse_exchanges else 0


def _wrap(gm, example_inputs, ctx: PassContext, problems):
    return wrap_replicated_boundaries(gm, ctx)


def _refresh(gm, example_inputs, ctx: PassContext, problems):
    return refresh_meta(gm, example_inputs)


#: the passes, in the order they run
PASSES = (
    ("propagate_sharding", _propagate),  # every node's layout (fxhalo.passes.propagate, or .localize)
    ("rewrite", _rewrite),  # nodes that reach across a shard edge -> fxhalo.ops kernels
    ("fold_pads", _fold_pads),  # a sharded pad feeding one conv becomes that conv's halo edge (fxhalo.passes.fuse)
    ("fuse_norm_exchanges", _fuse_norms),  # a norm's statistics ride with the next halo op's rows
    ("wrap_replicated_boundaries", _wrap),  # gradient syncs of replicated inputs and parameters
    ("refresh_meta", _refresh),  # fake-tensor metadata of the rewritten graph
)


def run_pipeline(
    gm: torch.fx.GraphModule,
    example_inputs,
    ctx: PassContext,
    *,
    problems: list | None = None,
    stop_after: str | None = None,
) -> torch.fx.GraphModule:
    """Run :data:`PASSES` on ``gm`` in place (no collectives); returns ``gm``.

    Without ``problems`` the first refusal raises its :class:`~fxhalo.errors.FxHaloError`,
    as the backend needs.  With a list, every refused node is appended to it as
    ``(node, error)`` and left as written, and the later passes rewrite the rest, so
    that one run lists every problem (explain, validate).  If a pass after the
    propagation then fails (a refusal upstream can leave shapes the rest cannot be
    planned with), its error is appended as ``(None, error)`` and the run stops there;
    an error of the propagation itself raises.  ``stop_after`` names the last pass to run.
    """
    if stop_after is not None and stop_after not in {name for name, _ in PASSES}:
        raise ValueError(f"no pass named {stop_after!r}")
    debug = log.isEnabledFor(logging.DEBUG)
    for name, run in PASSES:
        before = len(gm.graph.nodes) if debug else 0
        start = time.perf_counter()
        try:
            changed = run(gm, example_inputs, ctx, problems)
        except Exception as e:
            if problems is None or name == PASSES[0][0]:
                raise
            problems.append((None, e))
            return gm
        if debug:
            log.debug(
                "fxhalo pass %s: %.1f ms, %d -> %d nodes, returned %s",
                name,
                1e3 * (time.perf_counter() - start),
                before,
                len(gm.graph.nodes),
                changed,
            )
        _check(gm, name)
        if name == stop_after:
            break
    return gm


def _check(gm, name: str) -> None:
    """Each pass must leave a well-formed GraphModule (torchtitan's pass contract)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise AssertionError(f"fxhalo pass {name} left {type(gm).__name__}, not a GraphModule")
    gm.graph.lint()
