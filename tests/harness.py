"""One harness for every multi-rank test: spawn N gloo ranks, run a function, collect results.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn),
initialises a gloo process group with a timeout in each, calls
``fn(rank, world_size, *args)`` and returns the list of per-rank return values.
Any rank's exception is re-raised in the parent with every failing rank's
traceback; a rank that does not finish within ``timeout`` seconds fails the
test (all ranks are killed), so no test can hang.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

PG_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, results):
    import torch.distributed as dist

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pools per rank
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world_size: int, *args, timeout: float = 600):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, object]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(got))} did not finish "
                                   f"within {timeout} s")
            try:
                rank, status, out = results.get(timeout=min(left, 1.0))
                got[rank] = (status, out)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
                if dead and all(not procs[r].is_alive() for r in dead):
                    # give the queue a moment: a rank may have exited right after posting
                    try:
                        rank, status, out = results.get(timeout=2.0)
                        got[rank] = (status, out)
                        continue
                    except queue.Empty:
                        raise RuntimeError(f"ranks {dead} died without reporting "
                                           f"(exit codes {[procs[r].exitcode for r in dead]})")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: out for r, (status, out) in got.items() if status == "error"}
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [got[r][1] for r in range(world_size)]


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """``(allclose, max abs error)`` with the project's fp32 tolerances."""
    if got is None or want is None:
        return got is None and want is None, 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return False, math.inf
    err = (got.detach().double() - want.detach().double()).abs().max().item() if got.numel() else 0.0
    return torch.allclose(got.detach(), want.detach(), atol=atol, rtol=rtol), err
