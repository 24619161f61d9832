"""The backend's log: ``TORCH_LOGS="+fxhalo"`` shows each graph the backend rewrote, on rank 0.

INFO (``TORCH_LOGS="fxhalo"``): one summary line per graph; DEBUG (``"+fxhalo"``):
the rewritten code, the :func:`fxhalo.explain` table and the summary, and the
time of each pass (:mod:`fxhalo.passes.pipeline`).
"""

from __future__ import annotations

import logging

import torch

from . import measure
from .passes.context import PassContext
from .report import Explanation, Part, totals

__all__ = ["log_rewrite"]

log = logging.getLogger(__name__)

# TORCH_LOGS="+fxhalo" works through torch's module-name fallback even before fxhalo is
# imported (torch parses the variable when it is imported, and an artifact name it does
# not know yet would be an error there).  Registering the alias also makes
# torch._logging.set_logs(modules={"fxhalo": logging.DEBUG}) work without walking the package.
torch._logging._internal.register_log("fxhalo", "fxhalo")


def log_rewrite(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """Log a graph the backend just rewrote (``TORCH_LOGS="+fxhalo"``), on rank 0.

    INFO: one summary line; DEBUG: the rewritten code, the table and the summary.
    With the log off it costs one level check.  It never fails the compilation:
    if describing the graph goes wrong, that is logged instead.
    """
    if not log.isEnabledFor(logging.INFO) or ctx.domain.rank != 0:
        return
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
        label = f"graph {compile_id}" if compile_id is not None else "graph"
        mesh = ctx.mesh if ctx.on_mesh else None
        labels = mesh.labels() if mesh else None
        rows = measure.measure_rows(gm, 0, torch.is_grad_enabled(), ctx.domain.size, labels)
        part = Part(0, gm, rows, measure.local_nodes(gm))
        ex = Explanation(
            world_size=mesh.shape if mesh else ctx.domain.size,
            rank=ctx.domain.rank,
            shard_dim=mesh.shard_dims if mesh else ctx.domain.shard_dim,
            parts=[part],
            notes=[],
        )
        log.info("fxhalo rewrote %s: forward %s", label, totals(ex.forward()))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "fxhalo rewrote %s for rank %d of %d:\n%s\n%s\n\n%s",
                label,
                ctx.domain.rank,
                ctx.domain.size,
                gm.print_readable(print_output=False),
                ex.table,
                ex.summary,
            )
    except Exception as e:  # pragma: no cover - a report must never break compilation
        log.info("fxhalo could not describe the rewritten graph: %s: %s", type(e).__name__, e)
