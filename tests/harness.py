"""The multi-rank test harness: fxhalo.launch.run_ranks plus the comparison the tests share.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` gloo ranks with a
process-group timeout and a hard deadline (see :mod:`fxhalo.launch`);
``close(got, want)`` applies the project's fp32 tolerances.
"""

from __future__ import annotations

import math

import torch

from fxhalo.launch import run_ranks

__all__ = ["run_ranks", "close", "check_against_one_device"]


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """``(allclose, max abs error)`` with the project's fp32 tolerances."""
    if got is None or want is None:
        return got is None and want is None, 0.0 if got is None and want is None else math.inf
    if got.shape != want.shape:
        return False, math.inf
    err = (got.detach().double() - want.detach().double()).abs().max().item() if got.numel() else 0.0
    return torch.allclose(got.detach(), want.detach(), atol=atol, rtol=rtol), err


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

    torch._dynamo.reset()  # a fresh compile: no recompile limits, no cached graphs
    torch.manual_seed(seed)
    ref_in = x.clone().requires_grad_()
    ref = model(ref_in)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    x_local = fxhalo.shard(x, shard_dim).requires_grad_()
    compiled = torch.compile(model, backend="domain_parallel", options={"shard_dim": shard_dim, **(options or {})})
    y = compiled(x_local)
    if replicated_output:
        y.backward(grad_out)
        checks = {"out": close(y, ref.detach())}
    else:
        y.backward(fxhalo.shard(grad_out, shard_dim))
        checks = {"out": close(y, fxhalo.shard(ref.detach(), shard_dim))}
    checks["grad_in"] = close(x_local.grad, fxhalo.shard(ref_in.grad, shard_dim))
    for (name, p), want in zip(model.named_parameters(), ref_grads):
        checks["grad_" + name] = close(p.grad, want)  # grad_sync: every rank holds the full gradient
    return checks
