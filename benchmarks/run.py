"""Time domain-parallel training steps against one process: ``python -m benchmarks.run``.

Example::

    python -m benchmarks.run --model unet2d --size 256 --ranks 2 --repeats 10

A *step* is one forward and backward of ``loss = sum(y**2) / numel(y)`` and, on P
ranks, the sum of the partial weight gradients over the ranks (one flat
``all_reduce``), so that every row ends with the one-device gradient.  Rows:

=====================  ======================================================
``eager``              one process, the plain model, 1 thread and P threads
``inductor``           one process, ``torch.compile(model)``, 1 and P threads
``fxhalo``             ``backend="domain_parallel"``, 1 rank and P ranks
``fxhalo-eager``       ``fxhalo.convert_to_domain_parallel`` (when it exists), P ranks
``credit``             CREDIT's ``credit.domain_parallel`` layers (if installed), P ranks
``shardtensor``        PhysicsNeMo's ``ShardTensor`` (if installed), P ranks
=====================  ======================================================

Every rank runs 1 thread.  One-process rows run in one spawned process, the P-rank
rows in one spawned gloo group; rows run one after another, never at once.  See
``docs/performance.md`` for every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import inspect
import json
import os
import pathlib
import sys
import time
import warnings

import torch
import torch.distributed as dist

from fxhalo.launch import run_ranks

from . import comm, shardtensor_compat
from . import report as report_
from .minimum import minimum_bytes
from .models import MODELS, Config, make, make_input

ROOT = pathlib.Path(__file__).resolve().parent
#: whether ShardTensor hands back weight gradients summed over the ranks (then the step does not sum them)
SHARDTENSOR_SUMS_GRADS = True
ROW_KINDS = ("eager", "inductor", "fxhalo", "fxhalo-eager", "credit", "shardtensor")


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    kind: str
    procs: int
    threads: int  # per process

    def label(self, compiler: str) -> str:
        what = {
            "eager": "eager",
            "inductor": "torch.compile" if compiler == "inductor" else f"torch.compile({compiler})",
            "fxhalo": "fxhalo compiled" if compiler == "inductor" else f"fxhalo compiled ({compiler})",
            "fxhalo-eager": "fxhalo eager layer",
            "credit": "CREDIT eager",
            "shardtensor": "PhysicsNeMo ShardTensor",
        }[self.kind]
        where = "1 process" if self.kind in ("eager", "inductor") else f"{self.procs} rank{'s' * (self.procs > 1)}"
        return f"{what}, {where}"


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: Config
    ranks: int
    repeats: int
    warmup: int
    compiler: str  # inner compiler of the compiled rows: "inductor", "aot_eager" or "eager"
    rows: tuple[Row, ...]
    count: bool = True
    check: bool = True
    #: ``torch._inductor.config`` settings for every compiled row, ``((name, value), ...)``; dotted
    #: names reach into the config's classes (``aten_distributed_optimizations.enable_overlap_scheduling``)
    inductor_config: tuple[tuple[str, object], ...] = ()
    #: serve every block of 128 KiB or more by its own mmap (:func:`map_large_blocks`), so that a step's
    #: memory is the peak of live tensor bytes rather than the rise of glibc's heap
    live_memory: bool = False


def inductor_settings(pairs) -> tuple[tuple[str, object], ...]:
    """``--inductor-config NAME=VALUE`` arguments as ``((name, value), ...)``, each value a Python literal,
    each name checked against ``torch._inductor.config`` (a typo would otherwise change nothing)."""
    import ast

    import torch._inductor.config as config

    out = []
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        owner = config
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        if not hasattr(owner, leaf):
            raise ValueError(f"torch._inductor.config has no setting {name!r}")
        out.append((name, value))
    return tuple(out)


def plan_rows(kinds, ranks: int) -> tuple[Row, ...]:
    rows = []
    for kind in kinds:
        if kind in ("eager", "inductor"):
            rows.append(Row(f"{kind}-1x1", kind, 1, 1))
            if ranks > 1:
                rows.append(Row(f"{kind}-1x{ranks}", kind, 1, ranks))
        elif kind == "fxhalo":
            rows.append(Row("fxhalo-1x1", kind, 1, 1))  # world size 1: the P=1 overhead
            rows.append(Row(f"fxhalo-{ranks}x1", kind, ranks, 1))
        else:
            rows.append(Row(f"{kind}-{ranks}x1", kind, ranks, 1))
    return tuple(rows)


# -- memory ------------------------------------------------------------------------


def _proc_status(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap back to the OS, so that the RSS before a step is not inflated by a cache."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: glibc's mallopt parameter for the mmap threshold
_M_MMAP_THRESHOLD = -3


def map_large_blocks(threshold: int = 128 * 1024) -> bool:
    """From now on, serve every block of ``threshold`` bytes or more by its own ``mmap`` (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``, which also stops glibc from raising the threshold as blocks are freed),
    so that freeing a tensor hands its pages back to the OS at once.  The rise of the resident set over a
    step is then the peak of live tensor bytes (to a page), as ``max_memory_allocated`` is on a GPU,
    instead of depending on what the heap kept from earlier frees.  Slower: every large allocation
    faults in fresh pages.  False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _measure_memory(step) -> dict:
    """Peak RSS during one step, and its rise over the RSS just before it."""
    _release_free_memory()
    base = _proc_status("VmRSS")
    if not _reset_peak_rss() or base is None:
        return {"rss_before": base, "rss_peak": None, "step_bytes": None}
    step()
    peak = _proc_status("VmHWM")
    return {"rss_before": base, "rss_peak": peak, "step_bytes": peak - base}


# -- one row ---------------------------------------------------------------------------


def _local_rows(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n).contiguous()


def _domain_tensor(slab: torch.Tensor, dim: int, n: int, size: int):
    """This rank's slab as the DomainTensor of the global input (the rows of :func:`_local_rows`)."""
    import fxhalo

    return fxhalo.from_local(slab, dim, lengths=[n // size] * size, run_check=False)


def _sum_grads(params, group) -> None:
    """Sum the partial weight gradients over the domain group: one flat all_reduce."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _make_step(fn, model, x, numel: int, group):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(sync: bool = True):
        for p in params:
            p.grad = None
        y = fn(x)
        if hasattr(y, "to_local"):  # a DomainTensor (the global view): the loss over this rank's rows
            y = y.to_local()
        (y.square().sum() / numel).backward()
        if sync and group is not None:
            _sum_grads(params, group)
        return y

    return step, params


def fxhalo_convert():
    """``fxhalo``'s eager converter, wherever it lives, or raise ``ImportError``."""
    import fxhalo

    fn = getattr(fxhalo, "convert_to_domain_parallel", None)
    for mod in ("fxhalo.convert", "fxhalo.nn"):
        if fn is not None:
            break
        try:
            fn = getattr(__import__(mod, fromlist=["_"]), "convert_to_domain_parallel", None)
        except ImportError:
            pass
    if fn is None:
        raise ImportError("fxhalo.convert_to_domain_parallel is not importable yet")
    return fn


def _convert_fxhalo(model, shard_dim: int):
    fn = fxhalo_convert()
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in {"shard_dim": shard_dim, "group": None}.items() if k in params}
    out = fn(model, **kwargs)
    return model if out is None else out


def _convert_credit(model, shard_dim: int, ndim: int, ranks: int):
    from .credit_compat import import_credit

    dp = import_credit()
    # CREDIT's GroupNorm calls dist.all_reduce inside autograd: torch warns on every backward
    # that it has no autograd kernel (the seeds' known bug); once is enough, in docs/performance.md.
    warnings.filterwarnings("ignore", message="c10d::allreduce_: an autograd kernel")
    # CREDIT names the dim of a 4-D tensor from the end (-2 = H); its Conv3d wrapper always uses dim 3.
    manager = dp.initialize_domain_parallel(ranks, ranks, shard_dim=shard_dim - ndim)
    dp.convert_to_domain_parallel(model, manager, shard_dim=shard_dim - ndim)
    if not any(type(m).__module__.startswith("credit.") for m in model.modules()):
        raise _Skip(
            "CREDIT converted no layer of this model: its run would be the unsharded model on each "
            "slab, with no communication and wrong results"
        )
    return model


class _Skip(Exception):
    """A row that cannot run here, with the reason shown in the report."""


def fxhalo_syncs_grads() -> bool:
    """Whether fxhalo's backend has ``grad_sync`` (sums weight gradients inside the backward)."""
    import importlib

    backend = importlib.import_module("fxhalo.backend")  # the module; fxhalo.backend is also a function
    return "grad_sync" in {f.name for f in dataclasses.fields(backend.DomainParallelBackend)}


def _build(row: Row, plan: Plan, rank: int, x: torch.Tensor):
    """``(callable, model, syncs)`` for ``row``; ``syncs``: it sums the weight gradients itself."""
    spec = MODELS[plan.cfg.model]
    model = make(plan.cfg)
    if row.kind == "eager":
        return model, model, False
    if row.kind == "inductor":
        return torch.compile(model, backend=plan.compiler), model, False
    if row.kind == "fxhalo":
        import fxhalo  # noqa: F401  (registers the backend)

        opts = {"shard_dim": spec.shard_dim}
        if plan.compiler != "inductor":
            opts["compiler"] = plan.compiler
        if row.procs == 1 and dist.get_world_size() > 1:
            # A one-rank row run inside a bigger group (the smoke test): a group of its own.
            opts["group"] = _singleton_group(rank)
        # Where the backend can, it sums the weight gradients in its backward (its default); then
        # the step must not sum them again.
        syncs = fxhalo_syncs_grads()
        return torch.compile(model, backend="domain_parallel", options=opts), model, syncs
    # the peers: (what the note says when the peer's package is missing, the conversion)
    peers = {
        "fxhalo-eager": ("", lambda: _same(_convert_fxhalo(model, spec.shard_dim))),
        "credit": ("CREDIT not available: ", lambda: _same(_convert_credit(model, spec.shard_dim, x.ndim, row.procs))),
        "shardtensor": (
            "PhysicsNeMo not available: ",
            lambda: (shardtensor_compat.wrap(model, spec.shard_dim, x.shape, row.procs), model, SHARDTENSOR_SUMS_GRADS),
        ),
    }
    if row.kind in peers:
        missing, convert = peers[row.kind]
        try:
            return convert()
        except ImportError as e:
            raise _Skip(f"{missing}{e}") from None
    raise AssertionError(row.kind)


def _same(model):
    """A converted model that runs as it is and sums nothing itself: ``(callable, model, syncs)``."""
    return model, model, False


def _singleton_group(rank: int):
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank makes every group
    return groups[rank]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``.  Weight gradients go in as one flat tensor: a conv bias
    that a norm follows has a zero gradient, which no per-tensor relative error survives."""
    scale = want.abs().max().item() or 1.0
    return (got.detach() - want).abs().max().item() / scale


def _count(row: Row, plan: Plan, fn, model, x, numel) -> dict:
    """Communication of one step (forward + backward, without the gradient sum)."""
    if row.kind == "fxhalo":
        import fxhalo

        torch._dynamo.reset()
        sink = comm.Tally()
        opts = {"shard_dim": MODELS[plan.cfg.model].shard_dim, "compiler": comm.counting_compiler(sink)}
        if fxhalo_syncs_grads():
            opts["grad_sync"] = False  # the weight-gradient sum is reported apart, as for every row
        counted = torch.compile(model, backend=fxhalo.backend(**opts))
        step, _ = _make_step(counted, model, x, numel, None)
        step()
        return sink.as_dict()
    step, _ = _make_step(fn, model, x, numel, None)
    with comm.CountingMode() as mode:
        step()
    return mode.tally.as_dict()


def _run_row(row: Row, plan: Plan, rank: int, x_full: torch.Tensor, ref) -> dict:
    spec = MODELS[plan.cfg.model]
    multi = row.procs > 1
    x = _local_rows(x_full, spec.shard_dim, rank, row.procs) if multi else x_full
    if multi and row.kind == "fxhalo" and spec.global_view:
        x = _domain_tensor(x, spec.shard_dim, x_full.shape[spec.shard_dim], row.procs)
    torch.set_num_threads(row.threads)
    torch._dynamo.reset()
    compiled = row.kind in ("inductor", "fxhalo") and plan.compiler == "inductor"
    fresh = _fresh_cache() if compiled else contextlib.nullcontext()
    out: dict = {"key": row.key}
    with fresh:
        fn, model, syncs = _build(row, plan, rank, x_full)
        step, params = _make_step(fn, model, x, x_full.numel(), dist.group.WORLD if multi and not syncs else None)
        out["grad_sum"] = "in the backward (fxhalo grad_sync)" if syncs else "one flat all_reduce after it"

        t0 = time.perf_counter()
        y = step()
        out["first_step_s"] = time.perf_counter() - t0
        if plan.check and ref is not None:
            y_ref, g_ref = ref
            want = _local_rows(y_ref, spec.shard_dim, rank, row.procs) if multi else y_ref
            got_g = torch.cat([p.grad.reshape(-1) for p in params])
            errs = torch.tensor([_rel_err(y, want), _rel_err(got_g, torch.cat([g.reshape(-1) for g in g_ref]))])
            if multi:
                dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            out["rel_err_out"], out["rel_err_grad"] = errs.tolist()
        del y
        for _ in range(max(plan.warmup - 1, 0)):
            step()
        times, cpu = [], []
        for _ in range(plan.repeats):
            if multi:
                dist.barrier()  # every rank starts the step together; the barrier is not timed
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # all of this process's threads: says how busy the rank was
        out["times_s"], out["cpu_s"] = times, cpu
        if multi:
            dist.barrier()
        out["memory"] = _measure_memory(step)
        if multi and plan.count:
            out["comm"] = _count(row, plan, fn, model, x, x_full.numel())
            out["grad_sync_bytes"] = sum(p.numel() * p.element_size() for p in params)
    return out


def _fresh_cache():
    """A cold Inductor cache for each compiled row, so that compile times are honest."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # private API; without it compile times may be warm
        return contextlib.nullcontext()
    return fresh_cache()


def _reference(cfg: Config, x: torch.Tensor):
    """One device: the output and the weight gradients of the step, for the error columns."""
    torch.set_num_threads(1)
    model = make(cfg)
    y = model(x)
    (y.square().sum() / x.numel()).backward()
    return y.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, world_size: int, plan: Plan, row_keys: tuple[str, ...]) -> dict:
    """Every row in ``row_keys`` on this process's group, one after another."""
    if plan.live_memory and not map_large_blocks():
        raise RuntimeError("--live-memory needs glibc's mallopt")
    x_full = make_input(plan.cfg)
    ref = _reference(plan.cfg, x_full) if plan.check else None
    results = {}
    settings = torch._inductor.config.patch(dict(plan.inductor_config))
    for row in plan.rows:
        if row.key not in row_keys:
            continue
        try:
            with settings:
                results[row.key] = _run_row(row, plan, rank, x_full, ref)
        except _Skip as e:
            results[row.key] = {"key": row.key, "skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            results[row.key] = {"key": row.key, "skipped": f"failed: {msg}"}
        finally:
            gc.collect()
    if world_size == 1 and {"inductor-1x1", "fxhalo-1x1"} <= set(row_keys) and plan.compiler == "inductor":
        if "skipped" in results.get("inductor-1x1", {}):
            # torch cannot compile this model in one process (the FNO's complex ops under Inductor in
            # torch 2.13): no pairs, and the report has no P=1 figure
            results["_paired_p1"] = None
        else:
            with settings:
                results["_paired_p1"] = _paired_p1(plan, x_full)
    results["_maxrss"] = _lifetime_peak_rss()
    return results


def _paired_p1(plan: Plan, x_full: torch.Tensor) -> dict:
    """The P=1 overhead measured in pairs: Inductor's step and fxhalo's world-size-1 step, alternately.

    The rows above run one after another, so a drift of the machine's speed between them
    (here +-15 % from minute to minute) shows up as overhead.  Here both compiled models
    are warm and step in turn (A B, then B A, ...), ``2 * repeats`` pairs, and each pair gives one ratio.
    """
    import fxhalo  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)
    torch._dynamo.reset()
    inductor, fx = make(plan.cfg), make(plan.cfg)
    steps = {
        "inductor": _make_step(torch.compile(inductor), inductor, x_full, x_full.numel(), None)[0],
        "fxhalo": _make_step(
            torch.compile(fx, backend="domain_parallel", options={"shard_dim": MODELS[plan.cfg.model].shard_dim}),
            fx,
            x_full,
            x_full.numel(),
            None,
        )[0],
    }
    for step in steps.values():
        for _ in range(max(plan.warmup, 1)):
            step()
    times: dict[str, list[float]] = {"inductor": [], "fxhalo": []}
    for i in range(2 * plan.repeats):  # twice the rows' repeats: one step varies by +-15 % here
        for name in ("inductor", "fxhalo") if i % 2 == 0 else ("fxhalo", "inductor"):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {"times_s": times, "ratios": [f / i for f, i in zip(times["fxhalo"], times["inductor"])]}


def _lifetime_peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# -- the parent: launch, combine, report -----------------------------------------------


def measure(plan: Plan, *, timeout: float = 3600) -> dict[str, list[dict]]:
    """Every row's per-rank results: one-process rows in one spawned process, then the P-rank rows."""
    per_row: dict[str, list[dict]] = {}
    for world in (1, plan.ranks):
        keys = tuple(r.key for r in plan.rows if (r.procs == 1) == (world == 1))
        if not keys:
            continue
        got = run_ranks(_worker, world, plan, keys, timeout=timeout)
        for key in keys + ("_maxrss", "_paired_p1"):
            per_row.setdefault(key, []).extend(g[key] for g in got if key in g)
    return per_row


def assemble(plan: Plan, per_row: dict[str, list[dict]], *, started: float, host: dict, command: str = "") -> dict:
    """The report: configuration, machine, analytic minimum, every row's figures, the targets."""
    spec = MODELS[plan.cfg.model]
    x = make_input(plan.cfg)
    minimum = minimum_bytes(make(plan.cfg), x, spec.shard_dim, plan.ranks)
    host = dict(host, load_avg_1m_end=os.getloadavg()[0])
    report = {
        "command": command,
        "date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_s": time.time() - started,
        "config": dataclasses.asdict(plan.cfg)
        | {
            "shard_dim": spec.shard_dim,
            "input_shape": list(x.shape),
            "ranks": plan.ranks,
            "repeats": plan.repeats,
            "warmup": plan.warmup,
            "compiler": plan.compiler,
            "inductor_config": dict(plan.inductor_config),
            "live_memory": plan.live_memory,
        },
        "machine": host,
        "lifetime_peak_rss_bytes": per_row.get("_maxrss", []),
        "paired_p1": (per_row.get("_paired_p1") or [None])[0],
        "minimum": {
            "exchange_bytes": minimum.exchange,
            "reduce_bytes": minimum.reduce,
            "total_bytes": minimum.total,
            "ops": minimum.ops,
            "uncosted": minimum.uncosted,
        },
        "rows": [
            report_.combine(r.key, r.label(plan.compiler), r.kind, r.procs, r.threads, per_row[r.key])
            for r in plan.rows
            if r.key in per_row
        ],
    }
    report_.derive(report)
    return report


def run(plan: Plan, *, timeout: float = 3600, command: str = "") -> dict:
    """Run every row of ``plan``; the report as a dict."""
    started, host = time.time(), report_.machine()
    return assemble(plan, measure(plan, timeout=timeout), started=started, host=host, command=command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet2d", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, help="length of every spatial dim (default: per model)")
    parser.add_argument("--batch", type=int, help="batch size (default: per model)")
    parser.add_argument("--width", type=int, help="channels (default: per model)")
    parser.add_argument("--tiny", action="store_true", help="the smoke test's tiny configuration")
    parser.add_argument("--ranks", type=int, default=2, help="P, the ranks of the domain-parallel rows")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per row, the first (compiling) one included"
    )
    parser.add_argument("--rows", default=",".join(ROW_KINDS), help=f"comma-separated subset of {ROW_KINDS}")
    parser.add_argument(
        "--compiler",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="compiler of the compiled rows (aot_eager, eager: quick, for smoke tests)",
    )
    parser.add_argument(
        "--inductor-config",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a torch._inductor.config setting for every compiled row, e.g. reorder_for_compute_comm_overlap=True "
        "(repeatable; dotted names reach into its classes)",
    )
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="step memory as the peak of live tensor bytes (every large block mmapped; steps are slower)",
    )
    parser.add_argument("--no-count", action="store_true", help="skip the (untimed) byte-counting step")
    parser.add_argument("--no-check", action="store_true", help="skip the one-device error check")
    parser.add_argument("--json", help="where to write the JSON (default benchmarks/results/<name>.json)")
    parser.add_argument("--name", help="result name (default <model>-<size>-p<ranks>)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks are killed")
    args = parser.parse_args(argv)

    spec = MODELS[args.model]
    cfg = spec.tiny_config() if args.tiny else spec.config(args.size, args.batch, args.width)
    kinds = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = set(kinds) - set(ROW_KINDS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {ROW_KINDS}")
    plan = Plan(
        cfg,
        args.ranks,
        args.repeats,
        args.warmup,
        args.compiler,
        plan_rows(kinds, args.ranks),
        count=not args.no_count,
        check=not args.no_check,
        inductor_config=inductor_settings(args.inductor_config),
        live_memory=args.live_memory,
    )
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(plan, timeout=args.timeout, command=command)
    print(report_.summary(report))
    path = (
        pathlib.Path(args.json)
        if args.json
        else ROOT / "results" / f"{args.name or f'{cfg.model}-{cfg.size}-p{args.ranks}'}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
