"""CREDIT's CrossFormer on P ranks: CREDIT's own domain-parallel layers against fxhalo, side by side.

::

    python -m benchmarks.credit_models [--world-size 2] [--repeats 5]

Needs ``miles-credit`` and what CrossFormer imports (see ``.ci/run``); torchvision and
``segmentation_models_pytorch`` are answered by ``tests/credit_standin.py``.  The model
is the small CrossFormer of ``tests/distributed/test_credit.py`` (64 x 32, four stages,
one short- and one long-distance attention each), sharded along
latitude (dim 3 of ``[B, C, T, H, W]``).  Rows, each on P gloo ranks with 1 thread:

* ``CREDIT``: ``credit.domain_parallel.initialize_domain_parallel`` and
  ``convert_to_domain_parallel(model, manager, shard_dim=-2)``, run eagerly on each
  rank's slab, as CREDIT's docs show;
* ``fxhalo``: ``torch.compile(model, backend="domain_parallel")`` (inner compiler
  ``aot_eager``) on a DomainTensor.

Per row: the median step time (forward and backward), the largest error of the
output and of the input gradient against one process on the whole input (relative to
the largest reference value), and the bytes one rank sends per step (CREDIT's
collectives counted by a dispatch mode; fxhalo's from ``fxhalo.explain``).  CREDIT's
converted CrossFormer returns the whole field on every rank (its last layer
interpolates to the configured global size); each rank then back-propagates the
upstream gradient of its own rows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.distributed as dist

from fxhalo.launch import run_ranks


def _crossformer():
    from tests import credit_standin

    credit_standin.install()
    from tests.distributed.test_credit import _models

    torch.manual_seed(0)
    return _models()["crossformer"]


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _time(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _run(rank, world_size, repeats):
    import fxhalo
    from benchmarks import comm

    torch.set_num_threads(1)
    model, x = _crossformer()
    ref_in = x.clone().requires_grad_()
    ref = model(ref_in)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    model.zero_grad()
    out = {}

    # fxhalo: the model as written, compiled on a DomainTensor
    xs = fxhalo.shard(x, 3)
    slab = xs.to_local().detach().requires_grad_()
    xd = fxhalo.from_local(slab, 3, lengths=xs.partition, run_check=False)
    compiled = torch.compile(copy.deepcopy(model), backend="domain_parallel", options={"compiler": "aot_eager"})
    a, b = xd.spec.bounds(rank)

    def fx_step():
        slab.grad = None
        y = compiled(xd)
        y.to_local().backward(grad_out.narrow(3, a, b - a))
        return y

    y = fx_step()
    ex = fxhalo.explain(
        model, torch.empty(x.shape, device="meta"), world_size=world_size, rank=rank, global_view=True, shard_dim=3
    )
    out["fxhalo"] = {
        "time": _time(fx_step, repeats),
        "out": _rel(fxhalo.gather(y).detach(), ref.detach()),
        "grad_in": _rel(slab.grad, ref_in.grad.narrow(3, a, b - a)),
        "bytes": sum(c.bytes for c in ex.forward()) + sum(c.bytes for c in ex.backward()),
    }

    # CREDIT: its converter on a copy of the same model, eager, on the same slab
    from benchmarks.credit_compat import import_credit

    dp = import_credit()
    warnings.filterwarnings("ignore", message="c10d::allreduce_: an autograd kernel")
    manager = dp.initialize_domain_parallel(world_size, world_size, shard_dim=-2)
    credit_model = copy.deepcopy(model)
    dp.convert_to_domain_parallel(credit_model, manager, shard_dim=-2)
    cslab = slab.detach().clone().requires_grad_()

    def credit_step():
        cslab.grad = None
        y = credit_model(cslab)
        # CREDIT's CrossFormer ends with an interpolation to its configured (global) size, which its
        # converted layer returns whole on every rank; each rank then back-propagates its own rows of it.
        mine = y.narrow(3, a, b - a) if y.shape[3] == ref.shape[3] else y
        mine.backward(grad_out.narrow(3, a, b - a))
        return y

    try:
        y = credit_step()
        with comm.CountingMode() as mode:
            credit_step()
        if y.shape[3] == ref.shape[3]:
            got = y.detach()
        else:
            whole = [torch.empty_like(y) for _ in range(world_size)]
            dist.all_gather(whole, y.detach().contiguous())
            got = torch.cat(whole, 3)
        out["CREDIT"] = {
            "time": _time(credit_step, repeats),
            "whole_output": y.shape[3] == ref.shape[3],
            "out": _rel(got, ref.detach()),
            "grad_in": _rel(cslab.grad, ref_in.grad.narrow(3, a, b - a)),
            "bytes": sum(mode.tally.as_dict()["bytes"].values()),
        }
    except Exception as e:  # CREDIT's layers may not run this model at all
        out["CREDIT"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    dist.barrier()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    per_rank = run_ranks(_run, args.world_size, args.repeats, timeout=1800)
    print(f"CrossFormer 64 x 32, {args.world_size} ranks (gloo, CPU, 1 thread each), median of {args.repeats} steps")
    print(f"{'row':8} {'ms/step':>9} {'max rel err out':>16} {'max rel err grad_in':>20} {'bytes/step/rank':>16}")
    for row in ("CREDIT", "fxhalo"):
        r0 = per_rank[0][row]
        if "error" in r0:
            print(f"{row:8} fails: {r0['error']}")
            continue
        t = max(r[row]["time"] for r in per_rank)
        err_out = max(r[row]["out"] for r in per_rank)
        err_grad = max(r[row]["grad_in"] for r in per_rank)
        print(f"{row:8} {1e3 * t:9.1f} {err_out:16.2e} {err_grad:20.2e} {max(r[row]['bytes'] for r in per_rank):16,d}")
        if r0.get("whole_output"):
            print(f"{'':8} (its output is the whole field on every rank; each rank back-propagates its own rows)")


if __name__ == "__main__":
    main()
