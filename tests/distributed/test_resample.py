"""Resampling along the sharded dim on 2, 3 and 4 ranks: a random sweep plus explicit cases.

One spawned group per world size runs everything:

- the sweep: >= 36 random transposed convs, max/avg/adaptive pools and interpolations
  per world size (112 in all; with the 60 pads, rolls, flips and shuffles of
  test_shift.py, 172 resampling and shifting configurations), each compiled on its own and compared with one device
  (see :mod:`tests.distributed.resample_cases` for which error points to which bug);
- explicit cases: interpolation with non-integer ratios and both ``align_corners``,
  max-pool indices (windows of ``-inf`` at the edge included), the kernel 3 / stride 2 /
  padding 1 transposed conv, and refusals.

Rank 0's table groups the sweep by family (and interpolation mode).
"""

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from tests.harness import batches_of, close, run_ranks, sweep_compiler

N_CASES = {2: 40, 3: 36, 4: 36}


#: cases compiled together as one graph (one Dynamo trace and one compile for all of them)
BATCH = 25


def _recording(seen, world_size):
    """The sweep's inner compiler (:func:`~tests.harness.sweep_compiler`), noting per graph output
    whether the pass inserted an fxhalo kernel."""
    from fxhalo.backend import _inner
    from tests.distributed.test_conv import _halo_outputs

    def compiler(gm, example_inputs):
        seen["kernel"] = _halo_outputs(gm)
        return _inner(sweep_compiler(world_size))(gm, example_inputs)

    return compiler


def _sweep(world_size, n_cases, batch=BATCH):
    """Every case, in batches of cases of one shard dim: one compile per batch, a result per case."""
    from tests.distributed.resample_cases import random_cases, run_case, run_cases

    seen = {}
    cases = random_cases(n_cases, world_size)
    results = [None] * len(cases)
    for chunk in batches_of(cases, batch):
        seen.clear()
        rs = run_cases([cases[i] for i in chunk], world_size, _recording(seen, world_size), seeds=chunk)
        flags = seen.get("kernel")
        # one graph output per case, two with indices; the indices come from the same kernel
        widths = [1 + cases[i].returns_indices for i in chunk]
        if flags is not None and len(flags) == sum(widths):
            starts = [sum(widths[:j]) for j in range(len(chunk))]
            kernels = [any(flags[s : s + w]) for s, w in zip(starts, widths)]
        else:  # the batch ran case by case, or its outputs do not map to cases: one compile each
            kernels = []
            for i in chunk:
                seen.clear()
                run_case(cases[i], world_size, _recording(seen, world_size), seed=i)
                kernels.append(any(seen.get("kernel", ())))
        for i, r, kernel in zip(chunk, rs, kernels):
            r.update(category=cases[i].category, kernel=kernel, case=repr(cases[i]))
            results[i] = r
    return results


# -- explicit cases ---------------------------------------------------------------


class Many(nn.Module):
    """Several resampling ops of one input, returned together (one compile checks them all)."""

    def __init__(self, *calls):
        super().__init__()
        self.calls = calls  # (function, kwargs)

    def forward(self, x):
        out = []
        for fn, kw in self.calls:
            y = fn(x, **kw)
            out.extend(y if isinstance(y, tuple) else (y,))
        return tuple(out)


def _compare(model, x, shard_dim, world_size):
    """Per-output forward checks (indices exactly), the input gradient of their sum, and the
    weight gradients summed over ranks."""

    import fxhalo

    torch._dynamo.reset()
    ref_in = x.clone().requires_grad_()
    refs = _as_tuple(model(ref_in))
    grads = [torch.randn_like(r) if r.is_floating_point() else None for r in refs]
    torch.autograd.backward([r for r, g in zip(refs, grads) if g is not None], [g for g in grads if g is not None])
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x_local = fxhalo.domain.shard(x, shard_dim).requires_grad_()
    compiled = torch.compile(
        model, backend="domain_parallel", options={"compiler": "aot_eager", "shard_dim": shard_dim}
    )
    outs = _as_tuple(compiled(x_local))
    torch.autograd.backward(
        [o for o, g in zip(outs, grads) if g is not None],
        [fxhalo.domain.shard(g, shard_dim) for g in grads if g is not None],
    )
    checks = {}
    for i, (o, r) in enumerate(zip(outs, refs)):
        want = fxhalo.domain.shard(r.detach(), shard_dim)
        checks[f"out{i}"] = close(o, want)[0] if r.is_floating_point() else bool(torch.equal(o, want))
    checks["grad_in"] = close(x_local.grad, fxhalo.domain.shard(ref_in.grad, shard_dim))[0]
    for (name, p), want in zip(model.named_parameters(), ref_grads):
        checks["grad_" + name] = close(p.grad, want)[0]  # grad_sync: every rank holds the full gradient
    return checks


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)


def _explicit(world_size):
    torch.manual_seed(1)
    P = world_size
    out = {}
    # 2-D, H sharded, 8 local rows: non-integer ratios up (x1.5, size ratio 1.25) and down (x0.75).
    calls = []
    for mode in ("bilinear", "bicubic"):
        for align in (False, True):
            for how in ({"scale_factor": 1.5}, {"scale_factor": 0.75}, {"size": (10 * P, 7)}):
                calls.append((F.interpolate, dict(how, mode=mode, align_corners=align)))
    for mode in ("nearest", "nearest-exact"):
        for how in ({"scale_factor": 1.5}, {"scale_factor": 0.75}, {"size": (10 * P, 7)}):
            calls.append((F.interpolate, dict(how, mode=mode)))
    out["interp_2d"] = _outcome(lambda: _compare(Many(*calls), torch.randn(2, 2, 8 * P, 5), 2, P))
    # 1-D linear and 3-D trilinear (D sharded), both align_corners, non-integer ratios.
    lin = [
        (F.interpolate, dict(how, mode="linear", align_corners=a))
        for a in (False, True)
        for how in ({"scale_factor": 2.5}, {"size": 5 * P}, {"scale_factor": 0.75})
    ]
    out["interp_1d"] = _outcome(lambda: _compare(Many(*lin), torch.randn(1, 3, 4 * P), 2, P))
    tri = [
        (F.interpolate, dict(scale_factor=(1.5, 2.0, 0.5), mode="trilinear", align_corners=a)) for a in (False, True)
    ]
    out["interp_3d"] = _outcome(lambda: _compare(Many(*tri), torch.randn(1, 2, 4 * P, 3, 4), 2, P))
    # Max-pool indices must index the global input; the first two global rows are -inf, so the
    # top windows on rank 0 are all -inf and keep torch's index, their first real cell.
    x = torch.randn(2, 2, 8 * P, 7)
    x[:, :, :2] = float("-inf")
    pools = [
        (F.max_pool2d, dict(kernel_size=3, stride=2, padding=1, return_indices=True)),
        (
            F.max_pool2d,
            dict(kernel_size=(2, 3), stride=1, padding=(1, 1), dilation=(2, 1), ceil_mode=True, return_indices=True),
        ),
        (F.max_pool2d, dict(kernel_size=2, return_indices=True)),
    ]
    out["pool_indices_2d"] = _outcome(lambda: _compare(Many(*pools), x, 2, P))
    pool3 = [(F.max_pool3d, dict(kernel_size=3, stride=(1, 2, 1), padding=1, return_indices=True))]
    out["pool_indices_3d"] = _outcome(lambda: _compare(Many(*pool3), torch.randn(1, 2, 3, 4 * P, 5), 3, P))
    # The transposed conv the system we replace gets wrong: kernel 3, stride 2, padding 1.
    up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
    out["convT_3_2_1"] = _outcome(lambda: _compare(up, torch.randn(2, 2, 3 * P, 5), 2, P))
    odd = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)  # 2N - 1 rows: uneven output shards
    out["convT_3_2_1_odd"] = _outcome(lambda: _compare(odd, torch.randn(2, 2, 3 * P, 5), 2, P))
    aa = Many((F.interpolate, dict(scale_factor=0.5, mode="bilinear", antialias=True)))
    out["antialias"] = _outcome(lambda: _compare(aa, torch.randn(1, 1, 4 * P, 4), 2, P))
    return out


def _run(rank, world_size, n_cases):
    return {"sweep": _sweep(world_size, n_cases), "explicit": _explicit(world_size)}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"P{p}")
def ranks(request):
    world_size = request.param
    return world_size, run_ranks(_run, world_size, N_CASES[world_size], timeout=420)


def _table(world_size, per_rank):
    """One row per family; a case matches when it matched on every rank."""
    counts = {}
    for i, case in enumerate(per_rank[0]):
        row = counts.setdefault(case["category"], Counter())
        row["cases"] += 1
        row["fxhalo kernel"] += case["kernel"]
        row["left as is"] += not case["kernel"]
        row["matched"] += all(results[i]["ok"] for results in per_rank)
    cols = ["cases", "fxhalo kernel", "left as is", "matched"]
    table = [[key] + [counts[key][c] for c in cols] for key in sorted(counts)]
    total = Counter()
    for row in counts.values():
        total.update(row)
    table.append(["all"] + [total[c] for c in cols])
    return tabulate(table, headers=[f"P={world_size}"] + cols)


@pytest.mark.timeout(450)
def test_sweep_matches_one_device(ranks):
    world_size, per_rank = ranks
    sweeps = [r["sweep"] for r in per_rank]
    print()
    print(_table(world_size, sweeps))
    failures = [
        (r, c["case"], c["failed"], c["max_err"]) for r, results in enumerate(sweeps) for c in results if not c["ok"]
    ]
    assert not failures, failures[:10]
    assert len(sweeps[0]) >= N_CASES[world_size]
    assert sum(c["kernel"] for c in sweeps[0]) > len(sweeps[0]) // 2


def _matched(per_rank, name):
    seen = [r["explicit"][name] for r in per_rank]
    assert all(kind == "ok" for kind, _ in seen), seen
    return [checks for _, checks in seen]


@pytest.mark.timeout(450)
@pytest.mark.parametrize("name", ["interp_2d", "interp_1d", "interp_3d"])
def test_interpolation_non_integer_ratios_both_align_corners(ranks, name):
    _, per_rank = ranks
    for checks in _matched(per_rank, name):
        assert all(checks.values()), {k: v for k, v in checks.items() if not v}


@pytest.mark.timeout(450)
@pytest.mark.parametrize("name", ["pool_indices_2d", "pool_indices_3d"])
def test_max_pool_indices_refer_to_the_global_input(ranks, name):
    _, per_rank = ranks
    for checks in _matched(per_rank, name):
        assert all(checks.values()), {k: v for k, v in checks.items() if not v}


@pytest.mark.timeout(450)
def test_conv_transpose_kernel3_stride2_padding1(ranks):
    _, per_rank = ranks
    for checks in _matched(per_rank, "convT_3_2_1"):
        assert all(checks.values()), checks
    # Without output_padding the output has 2N - 1 rows: split unevenly by the partition rule.
    for checks in _matched(per_rank, "convT_3_2_1_odd"):
        assert all(checks.values()), checks


@pytest.mark.timeout(450)
def test_antialias_is_refused_on_every_rank(ranks):
    _, per_rank = ranks
    for kind, msg in (r["explicit"]["antialias"] for r in per_rank):
        assert kind == "FxHaloError" and "antialias" in msg, msg
