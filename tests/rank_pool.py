"""Ranks kept alive between tests: one pool of spawned gloo ranks per world size, for the whole session.

Spawning is what a short multi-rank test mostly paid for: each rank imports torch,
Dynamo and fxhalo again (about 4 s of CPU on the 2-core CI machine) and joins a new
process group, and the suite spawns some 40 groups.  :func:`run_ranks` here has the
signature of :func:`fxhalo.launch.run_ranks` and runs ``fn(rank, world_size, *args)``
on a pool of ``world_size`` ranks started on first use and kept for the next test of
that world size.  The ranks are still real spawned processes in a real gloo process
group with a timeout.

Between jobs a rank goes back to what a fresh process would show a test: Dynamo's
caches are reset (recompile limits would otherwise carry from test to test), the RNG
has torch's default seed again (tests that build the same model on every rank without
seeding rely on it), and the environment and the default dtype are restored.

A pool that failed in any way (a rank raised, died, or did not report by the deadline,
or the test was interrupted while waiting) is killed, and the next test gets a new one:
after a rank raised, the ranks may disagree on which collectives ran, and gloo could hand
a later test a stale message.  Tests that need a process of their own (one that patches
``torch.distributed``, say) call :func:`fxhalo.launch.run_ranks`.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import itertools
import os
import pickle
import queue
import traceback

import torch
import torch.multiprocessing as mp

from fxhalo.launch import _free_port, join_group

__all__ = ["run_ranks", "shutdown"]

#: torch's seed in a fresh process (``torch.initial_seed()`` before anyone seeds)
_DEFAULT_SEED = torch.initial_seed()


def _rank_loop(rank, world_size, port, inbox, results):
    join_group(rank, world_size, port)
    environ = dict(os.environ)
    while True:
        job = inbox.get()
        if job is None:
            return
        job_id, payload = job
        torch._dynamo.reset()
        torch.manual_seed(_DEFAULT_SEED)
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        try:
            fn, args = pickle.loads(payload)
            results.put((job_id, rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            results.put((job_id, rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            os.environ.clear()
            os.environ.update(environ)
            # What the job left alive (modules, caches) would be scanned again by every garbage
            # collection of the next jobs, which allocate a lot while compiling: collect it once,
            # then take the survivors out of the collector's generations.
            torch._dynamo.reset()
            gc.collect()
            gc.freeze()


class _Pool:
    """``world_size`` spawned ranks, each waiting on its own inbox for the next job."""

    _ids = itertools.count()

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_rank_loop, args=(r, world_size, port, self.inboxes[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> dict[int, tuple[str, object]]:
        """Every rank's ``(status, result)`` of one job; raises when a rank dies or the deadline passes."""
        job_id = next(self._ids)
        payload = pickle.dumps((fn, args))
        for inbox in self.inboxes:
            inbox.put((job_id, payload))
        got: dict[int, tuple[str, object]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(got) < self.world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                missing = sorted(set(range(self.world_size)) - set(got))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s")
            try:
                jid, rank, status, out = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if r not in got and not p.is_alive()]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    raise RuntimeError(f"ranks {dead} died without reporting (exit codes {codes})") from None
                continue
            if jid == job_id:
                got[rank] = (status, out)
        return got

    def close(self, kill: bool = False) -> None:
        if not kill:
            for inbox in self.inboxes:
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict[int, _Pool] = {}


def run_ranks(fn, world_size: int, *args, timeout: float = 600):
    """Run ``fn(rank, world_size, *args)`` on the pool of ``world_size`` ranks; per-rank results (as
    :func:`fxhalo.launch.run_ranks`: a rank's exception is raised here with every failing rank's traceback)."""
    pool = _POOLS.pop(world_size, None) or _Pool(world_size)
    try:
        got = pool.run(fn, args, timeout)
    except BaseException:
        pool.close(kill=True)
        raise
    errors = {r: out for r, (status, out) in got.items() if status == "error"}
    if errors:
        pool.close(kill=True)
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    _POOLS[world_size] = pool
    return [pickle.loads(got[r][1]) for r in range(world_size)]


@atexit.register
def shutdown() -> None:
    """Stop every pool (the session's end)."""
    while _POOLS:
        _POOLS.popitem()[1].close()
