"""Start ranks on one machine: spawn N processes, each in a gloo process group with a timeout.

``run_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on every
rank and returns the per-rank results.  A rank's exception is re-raised in the
parent with every failing rank's traceback, and a rank that has not finished
by ``timeout`` seconds fails the run (all ranks are killed): nothing can hang.
The test suite and ``python -m fxhalo.demo`` both launch through it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "PG_TIMEOUT_S"]

PG_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world_size: int, port: int) -> None:
    """What a spawned rank does first: one thread, no compile workers, and the gloo group on ``port``."""
    import torch.distributed as dist

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pools per rank
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )


def _child(rank, world_size, port, fn, args, results):
    import torch.distributed as dist

    try:
        join_group(rank, world_size, port)
        # Plain bytes: through the queue, torch would send a tensor as a file descriptor that
        # the parent fetches from this process after it reported; a rank that has exited by
        # then leaves the parent with FileNotFoundError (seen under load).
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
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
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, object]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, status, out = results.get(timeout=min(left, 1.0))
                got[rank] = (status, out)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if r not in got and not p.is_alive()]
            if dead:  # a rank that exits right after reporting may still have its result in flight
                try:
                    rank, status, out = results.get(timeout=2.0)
                    got[rank] = (status, out)
                except queue.Empty:
                    codes = [procs[r].exitcode for r in dead]
                    raise RuntimeError(f"ranks {dead} died without reporting (exit codes {codes})") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: out for r, (status, out) in got.items() if status == "error"}
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [pickle.loads(got[r][1]) for r in range(world_size)]
