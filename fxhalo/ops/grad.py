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
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)

__all__ = ["replicated_output", "replicated_input"]


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
        out = torch.ops._c10d_functional.all_reduce(grad.contiguous(), "sum", ctx.group_name)
        return torch.ops._c10d_functional.wait_tensor(out), None


def replicated_output(x: torch.Tensor, *, group_name: str, size: int) -> torch.Tensor:
    return _ReplicatedOutput.apply(x, size)


def replicated_input(x: torch.Tensor, *, group_name: str) -> torch.Tensor:
    return _ReplicatedInput.apply(x, group_name)
