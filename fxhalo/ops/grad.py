"""Gradient conventions at the edges of a rewritten graph.

Inside a graph every rank's gradient of a replicated value is a *partial* one:
the true gradient is the sum over the domain group.  That is what the autograd
formulas of the functional collectives assume (all_reduce -> all_reduce,
all_gather -> reduce_scatter), and what the weight gradients are.

Outside a graph a replicated value (a loss, a global mean) is the same on every
rank, and so is the gradient the user's code gives it.  Two small ops convert at
the boundary:

* :func:`replicated_output` - identity forward; backward divides the (identical)
  incoming gradient by the group size, so the partial gradients it feeds sum to it;
* :func:`replicated_input` - identity forward; backward all-reduces the partial
  gradients, so a replicated activation leaves the graph with its true gradient.

Parameters are replicated inputs too.  :func:`synced_params` does for a bucket of
them what :func:`replicated_input` does for one activation, with one all_reduce
for the whole bucket (``grad_sync``, on by default): after ``backward()`` every
rank holds the full gradient, identical on every rank, so the optimizer keeps the
replicas identical.
"""

from __future__ import annotations

import torch

from .collectives import all_reduce_sum

__all__ = ["replicated_output", "replicated_input", "synced_params"]


class _ReplicatedOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        ctx.size = size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.size, None


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group_name), None


def replicated_output(x: torch.Tensor, *, group_name: str, size: int) -> torch.Tensor:
    return _ReplicatedOutput.apply(x, size)


def replicated_input(x: torch.Tensor, *, group_name: str) -> torch.Tensor:
    return _ReplicatedInput.apply(x, group_name)


class _SyncedParams(torch.autograd.Function):
    """Identity on a bucket of parameters; backward sums their gradients over the group in one all_reduce."""

    @staticmethod
    def forward(ctx, group_name, *params):
        ctx.group_name = group_name
        ctx.shapes = [p.shape for p in params]
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):  # the same on every rank: the ranks run the same graph
            return (None,) * (len(grads) + 1)
        # A parameter this rank's graph did not reach still joins the bucket, as zeros:
        # every rank must send the same bucket.
        like = next(g for g in grads if g is not None)
        flat = torch.cat(
            [(g if g is not None else like.new_zeros(shape)).reshape(-1) for g, shape in zip(grads, ctx.shapes)]
        )
        total = all_reduce_sum(flat, ctx.group_name)
        out, start = [], 0
        for shape in ctx.shapes:
            n = shape.numel()
            out.append(total[start : start + n].view(shape))
            start += n
        return (None, *out)


def synced_params(*params: torch.Tensor, group_name: str) -> tuple[torch.Tensor, ...]:
    """The same parameters; their gradients are summed over ``group_name``'s ranks, as one bucket."""
    return _SyncedParams.apply(group_name, *params)
