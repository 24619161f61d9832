"""The multi-rank test harness: ranks to run on, plus the comparison the tests share.

``run_ranks(fn, world_size, *args)`` runs ``fn`` on ``world_size`` spawned gloo ranks with
a process-group timeout and a hard deadline, kept alive from test to test
(:mod:`tests.rank_pool`);
``close(got, want)`` applies the project's fp32 tolerances.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tests.rank_pool import run_ranks

__all__ = [
    "run_ranks",
    "close",
    "close_normwise",
    "check_against_one_device",
    "check_many_against_one_device",
    "check_global_view",
    "check_many_on_mesh",
    "mesh_block",
    "batches_of",
    "raised",
    "sweep_compiler",
]


def sweep_compiler(world_size: int) -> str:
    """The inner compiler of a sweep's leg on ``world_size`` ranks: ``aot_eager`` on 2 ranks, ``eager`` on more.

    What the legs on 3 and 4 ranks add is fxhalo's partition arithmetic (interior ranks,
    odd counts, uneven shards, halos past a neighbour): decided by the pass and run by
    the same kernels whatever compiles the rewritten graph.  AOTAutograd's trace of those
    kernels is checked on 2 ranks (and Inductor's in ``test_inductor.py``), and it is two
    thirds of a leg's time: the 200-case conv sweep on 3 ranks took 42 s with
    ``aot_eager`` and 14 s with ``eager`` here.
    """
    return "aot_eager" if world_size <= 2 else "eager"


def raised(fn) -> str:
    """What calling ``fn`` raised, as text the test can check on every rank: ``"FxHaloError: ..."``,
    another exception's type and message, or ``"no error"``."""
    import fxhalo

    try:
        fn()
    except fxhalo.FxHaloError as e:
        return "FxHaloError: " + str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def batches_of(cases, batch: int, key=lambda case: case.shard_dim):
    """Indices of ``cases`` in chunks of at most ``batch``, each chunk of one ``key`` (the sharded dim):
    the cases a sweep compiles together as one graph."""
    groups: dict = {}
    for i, case in enumerate(cases):
        groups.setdefault(key(case), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch):
            yield indices[start : start + batch]


def _real(t):
    """Complex tensors compare as their real views (``.double()`` would drop the imaginary part)."""
    return torch.view_as_real(t.detach().resolve_conj()) if t is not None and t.is_complex() else t


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """``(allclose, max abs error)`` with the project's fp32 tolerances."""
    got, want = _real(got), _real(want)
    if got is None or want is None:
        return got is None and want is None, 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return False, math.inf
    err = (got.detach().double() - want.detach().double()).abs().max().item() if got.numel() else 0.0
    return torch.allclose(got.detach(), want.detach(), atol=atol, rtol=rtol), err


def _one_device(model, x: torch.Tensor, seed: int):
    """``(input, output, upstream gradient, weight gradients)`` of ``model`` on the whole ``x``, on one device,
    after a fresh Dynamo (no recompile limits, no cached graphs)."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model.zero_grad()  # a model checked twice must not carry the last check's gradients
    ref_in = x.clone().requires_grad_()
    ref = model(ref_in)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    ref_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]  # None: unused
    model.zero_grad()
    return ref_in, ref, grad_out, ref_grads


def check_against_one_device(
    model, x: torch.Tensor, *, shard_dim: int = 2, options=None, replicated_output: bool = False, seed: int = 0
) -> dict:
    """Compile ``model`` with domain_parallel and compare with one device on the full ``x``.

    Every rank computes the reference itself.  Returns ``{check: (ok, max_err)}`` for
    ``out`` (the forward slab: wrong halo widths or edge rules show up here, usually
    on edge ranks), ``grad_in`` (the input-gradient slab: a halo gradient that does
    not reach its owner shows up here) and ``grad_<param>`` (the weight gradients,
    full on every rank with grad_sync).  ``replicated_output``: the model's output is replicated and
    gets the same gradient on every rank, as a loss does.
    """

    import fxhalo

    ref_in, ref, grad_out, ref_grads = _one_device(model, x, seed)
    x_local = fxhalo.domain.shard(x, shard_dim).requires_grad_()
    compiled = torch.compile(model, backend="domain_parallel", options={"shard_dim": shard_dim, **(options or {})})
    y = compiled(x_local)
    if replicated_output:
        y.backward(grad_out)
        checks = {"out": close(y, ref.detach())}
    else:
        y.backward(fxhalo.domain.shard(grad_out, shard_dim))
        checks = {"out": close(y, fxhalo.domain.shard(ref.detach(), shard_dim))}
    checks["grad_in"] = close(x_local.grad, fxhalo.domain.shard(ref_in.grad, shard_dim))
    for (name, p), want in zip(model.named_parameters(), ref_grads):
        checks["grad_" + name] = close(p.grad, want)  # grad_sync: every rank holds the full gradient
    return checks


def close_normwise(got, want, atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """The weight-gradient criterion (sums of many terms): ``max|a-b| <= atol + rtol * max|ref|``."""
    got, want = _real(got), _real(want)
    if got is None or want is None or got.shape != want.shape:
        return False, math.inf
    err = (got.detach().double() - want.detach().double()).abs().max().item()
    return err <= atol + rtol * want.detach().abs().max().item(), err


def check_global_view(
    model,
    x: torch.Tensor,
    *,
    shard_dim: int = 2,
    lengths=None,
    options=None,
    seed: int = 0,
    fullgraph: bool = True,
    group=None,
):
    """The global view against one device: ``model`` compiled on a DomainTensor of ``x`` split as ``lengths``
    (default balanced) over ``group`` (default WORLD; with a group, only its ranks call this).  Returns
    ``{check: (ok, max_err)}`` for ``out`` (this rank's slab of the output, which must be a DomainTensor),
    ``grad_in`` (the gradient that reached this rank's input slab) and ``grad_<param>`` (weight gradients,
    norm-wise).  ``fullgraph=False`` for models with graph breaks."""
    import fxhalo

    ref_in, ref, grad_out, ref_grads = _one_device(model, x, seed)
    x_local, x_global = _domain_input(x, shard_dim, lengths, group)
    options = {"compiler": sweep_compiler(_world_size(group)), **(options or {})}
    y = torch.compile(model, backend="domain_parallel", options=options, fullgraph=fullgraph)(x_global)
    if not isinstance(y, fxhalo.DomainTensor):
        raise AssertionError(f"the output is a {type(y).__name__}, not a DomainTensor")
    y.to_local().backward(_rows(grad_out, y))
    return _global_checks(model, y, x_local, x_global, (ref_in, ref, grad_out, ref_grads))


def _domain_input(x, shard_dim, lengths, group):
    """``(this rank's slab of x, requiring grad; the DomainTensor made from it)``.  With a ``group``, only its
    ranks call this (``from_local`` skips its check, which runs over WORLD)."""
    import fxhalo

    whole = fxhalo.shard(x, shard_dim, group, lengths=lengths)
    x_local = whole.to_local().detach().requires_grad_()
    return x_local, fxhalo.from_local(x_local, shard_dim, group, lengths=whole.partition, run_check=group is None)


def _rows(t: torch.Tensor, like) -> torch.Tensor:
    """The rows of the global ``t`` that this rank holds of the DomainTensor ``like`` (its block, on a mesh:
    along each sharded axis, the rows of this rank's coordinate)."""
    from fxhalo.domain import resolve_group

    for a in like.spec.axis_specs:
        start, stop = a.bounds(torch.distributed.get_rank(resolve_group(a.group_name)))
        t = t.narrow(a.dim, start, stop - start)
    return t


def _world_size(group) -> int:
    """The ranks of ``group``: a process group (``None``: WORLD) or a ``DeviceMesh``."""
    from torch.distributed.device_mesh import DeviceMesh

    return group.size() if isinstance(group, DeviceMesh) else torch.distributed.get_world_size(group)


def _global_checks(model, y, x_local, x_global, reference) -> dict:
    """``{check: (ok, max_err)}`` of a backward-run global-view output ``y`` against one device's ``reference``
    (``(input, output, upstream gradient, weight gradients)``, as :func:`_one_device` returns)."""
    ref_in, ref, _, ref_grads = reference
    checks = {"out": close(y.to_local(), _rows(ref.detach(), y))}
    checks["grad_in"] = close(x_local.grad, _rows(ref_in.grad, x_global))
    for (name, p), want in zip(model.named_parameters(), ref_grads):
        if want is None:  # a parameter the forward never reads: no gradient here either (or zeros)
            checks["grad_" + name] = (p.grad is None or not p.grad.any(), 0.0)
        else:
            checks["grad_" + name] = close_normwise(p.grad, want)
    return checks


class _Batch(nn.Module):
    """Independent models side by side: ``forward(*xs)`` returns ``(models[0](xs[0]), models[1](xs[1]), ...)``."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.models, xs))


def check_many_against_one_device(
    cases, *, shard_dim: int = 2, options=None, replicated_output: bool = False, return_exceptions: bool = False
) -> list:
    """:func:`check_against_one_device` for many independent ``(model, x, seed)`` cases, compiled as ONE graph.

    One Dynamo trace and one backend compile cover every case (compiling is what costs
    time in a sweep), but each case keeps its own input, parameters, reference and
    upstream gradient (drawn with the same seeds as :func:`check_against_one_device`),
    and one backward over all outputs keeps their gradients apart, since the cases
    share nothing.  Returns one ``{check: (ok, max_err)}`` per case, in order, as
    :func:`check_against_one_device` would.

    If the batch raises (a refusal, a crash), every case is run again on its own with
    :func:`check_against_one_device`, so the error belongs to its case as before:
    it propagates, or with ``return_exceptions`` takes that case's place in the list.
    Every rank must pass the same cases (the graphs' collectives must match).
    """

    import fxhalo

    def one_by_one():
        out = []
        for model, x, seed in cases:
            try:
                out.append(
                    check_against_one_device(
                        model,
                        x,
                        shard_dim=shard_dim,
                        options=options,
                        replicated_output=replicated_output,
                        seed=seed,
                    )
                )
            except Exception as e:
                if not return_exceptions:
                    raise
                out.append(e)
        return out

    refs = []
    for model, x, seed in cases:  # the reference, exactly as check_against_one_device draws it
        torch.manual_seed(seed)
        ref_in = x.clone().requires_grad_()
        ref = model(ref_in)
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
        refs.append((ref.detach(), grad_out, ref_in.grad, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()

    torch._dynamo.reset()  # a fresh compile: no recompile limits, no cached graphs
    x_locals = [fxhalo.domain.shard(x, shard_dim).requires_grad_() for _, x, _ in cases]
    batch = _Batch([model for model, _, _ in cases])
    try:
        compiled = torch.compile(batch, backend="domain_parallel", options={"shard_dim": shard_dim, **(options or {})})
        ys = compiled(*x_locals)
        ups = [
            grad_out if replicated_output else fxhalo.domain.shard(grad_out, shard_dim) for _, grad_out, _, _ in refs
        ]
        torch.autograd.backward(list(ys), ups)
    except Exception:
        batch.zero_grad(set_to_none=True)
        return one_by_one()

    results = []
    for (model, _, _), x_local, y, (ref, _, ref_in_grad, ref_grads) in zip(cases, x_locals, ys, refs):
        if replicated_output:
            checks = {"out": close(y, ref)}
        else:
            checks = {"out": close(y, fxhalo.domain.shard(ref, shard_dim))}
        checks["grad_in"] = close(x_local.grad, fxhalo.domain.shard(ref_in_grad, shard_dim))
        for (name, p), want in zip(model.named_parameters(), ref_grads):
            checks["grad_" + name] = close(p.grad, want)  # grad_sync: every rank holds the full gradient
        results.append(checks)
    return results


def check_many_global_view(cases, *, group=None, options=None, shard_dim: int | tuple = 2) -> list[dict]:
    """:func:`check_global_view` for many independent ``(model, x, lengths)`` cases, compiled as ONE graph.

    One Dynamo trace and one backend compile cover every case (compiling is what costs time
    in a sweep); each case keeps its own input, parameters, reference and upstream gradient,
    and one backward over all outputs keeps their gradients apart.  Returns one
    ``{check: (ok, max_err)}`` per case, in order.  If the batch raises, every case runs again
    on its own with :func:`check_global_view`, so the error belongs to its case.  Every rank
    of the group must pass the same cases.
    """
    refs = [_one_device(model, x, 0) for model, x, _ in cases]
    inputs = [_domain_input(x, shard_dim, lengths, group) for _, x, lengths in cases]
    torch._dynamo.reset()
    compiler = sweep_compiler(_world_size(group))
    compiled = torch.compile(
        _Batch([m for m, _, _ in cases]),
        backend="domain_parallel",
        options={"compiler": compiler, **(options or {})},
    )
    try:
        ys = compiled(*(x_global for _, x_global in inputs))
        ups = [_rows(grad_out, y) for y, (_, _, grad_out, _) in zip(ys, refs)]
        torch.autograd.backward([y.to_local() for y in ys], ups)
    except Exception:
        return [
            check_global_view(m, x, shard_dim=shard_dim, lengths=lengths, group=group, options=options)
            for m, x, lengths in cases
        ]
    return [
        _global_checks(model, y, x_local, x_global, ref)
        for (model, _, _), y, (x_local, x_global), ref in zip(cases, ys, inputs, refs)
    ]


def failed_cases(per_rank: list) -> list:
    """``(rank, case, checks)`` of every case that failed a check, from ranks that each return
    ``({case: {check: ok}}, ...)``."""
    return [
        (rank, name, checks)
        for rank, (results, *_) in enumerate(per_rank)
        for name, checks in results.items()
        if not all(checks.values())
    ]


def failed_by_world_size(per_rank: list, world_size: int) -> list:
    """``(rank, case, checks)`` of every case that failed a check on a ``world_size``-rank group, from a
    spawn whose ranks return ``{world_size: {case: {check: ok}}}`` (ranks past the group return none)."""
    return [
        (rank, name, checks)
        for rank, results in enumerate(per_rank[:world_size])
        for name, checks in results[world_size].items()
        if not all(checks.values())
    ]


def by_world_size(rank: int, world_size: int, sizes, run_group) -> dict:
    """``{P: run_group(P, group)}`` for each rank count ``P`` of ``sizes``, run by the first ``P`` ranks of a
    spawn of ``world_size`` on a group of their own (the whole world for the largest); the other ranks
    wait at a barrier.  Every rank makes every group, as ``new_group`` requires."""
    import torch.distributed as dist

    out = {}
    for P in sizes:
        group = dist.new_group(list(range(P))) if P < world_size else None
        if rank < P:
            out[P] = run_group(P, group)
        dist.barrier()
    return out


_SPAWNED: dict = {}


def spawned_once(fn, world_size: int, timeout: float) -> list:
    """``run_ranks(fn, world_size)``, run once per test session: the test functions of a file that sweeps
    every world size in one spawn share its per-rank results."""
    key = (fn.__module__, fn.__qualname__, world_size)
    if key not in _SPAWNED:
        _SPAWNED[key] = run_ranks(fn, world_size, timeout=timeout)
    return _SPAWNED[key]


def mesh_block(x: torch.Tensor, mesh, shard_dims) -> torch.Tensor:
    """This rank's block of the global ``x`` on a mesh of several domain axes: along each axis's dim, the rows
    the partition rule gives this rank's coordinate on that axis (:mod:`fxhalo.mesh`)."""
    for axis, d in zip(mesh.axes, shard_dims):
        start, stop = axis.bounds(x.shape[d])
        x = x.narrow(d, start, stop - start)
    return x.contiguous()


def _output_block(t: torch.Tensor, y: torch.Tensor, mesh, shard_dims) -> torch.Tensor:
    """This rank's block of the global output ``t``, cut along the sharded dims where the local output ``y``
    is shorter than ``t`` only: a dim pooled to one value is whole on every rank (before, every rank but the
    first got an empty gradient there, raised in its backward alone, and left the others waiting)."""
    for axis, d in zip(mesh.axes, shard_dims):
        if y.shape[d] != t.shape[d]:
            start, stop = axis.bounds(t.shape[d])
            t = t.narrow(d, start, stop - start)
    return t.contiguous()


def check_many_on_mesh(cases, group, shard_dims, *, options=None, compiler=None) -> list:
    """:func:`check_many_against_one_device` on a mesh of several domain axes: each rank passes its block
    (:func:`mesh_block`) of every case's input as a plain tensor, with ``options={"group": group,
    "shard_dim": shard_dims}``.  Returns one ``{check: (ok, max_err)}`` per case; if the batch raises, each
    case runs on its own, and one that raises gets ``{"error": (False, message)}``.  The inner compiler is
    :func:`sweep_compiler`'s for the whole domain's size unless ``compiler`` says otherwise."""
    from fxhalo.mesh import mesh_domain

    mesh = mesh_domain(group, shard_dims)
    compiler = compiler or sweep_compiler(mesh.whole.size)
    settings = {"group": group, "shard_dim": tuple(shard_dims), "compiler": compiler, **(options or {})}

    def run(batch_cases):
        refs = [_one_device(model, x, seed) for model, x, seed in batch_cases]
        x_locals = [mesh_block(x, mesh, shard_dims).requires_grad_() for _, x, _ in batch_cases]
        torch._dynamo.reset()
        compiled = torch.compile(_Batch([m for m, _, _ in batch_cases]), backend="domain_parallel", options=settings)
        ys = compiled(*x_locals)
        torch.autograd.backward(list(ys), [_output_block(g, y, mesh, shard_dims) for y, (_, _, g, _) in zip(ys, refs)])
        out = []
        for (model, _, _), x_local, y, (ref_in, ref, _, ref_grads) in zip(batch_cases, x_locals, ys, refs):
            checks = {"out": close(y, _output_block(ref.detach(), y, mesh, shard_dims))}
            checks["grad_in"] = close(x_local.grad, mesh_block(ref_in.grad, mesh, shard_dims))
            for (name, p), want in zip(model.named_parameters(), ref_grads):
                checks["grad_" + name] = close_normwise(p.grad, want)  # grad_sync: summed over the whole domain
            out.append(checks)
        return out

    try:
        return run(cases)
    except Exception:
        results = []
        for case in cases:
            case[0].zero_grad(set_to_none=True)
            try:
                results.extend(run([case]))
            except Exception as e:  # noqa: BLE001 - reported per case
                results.append({"error": (False, f"{type(e).__name__}: {e}")})
        return results
