"""The opt-in gather fallback: run an op without a rule on the all-gathered tensors.

Each sharded argument is all-gathered along its sharded dim (one functional
all_gather per argument, whose backward is a reduce-scatter), the op runs on the
global tensors exactly as on one device, and each output is re-sharded (this
rank keeps its block) or left replicated.  It costs a full copy of every gathered
argument on every rank, which is why it is opt-in and warned about.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives  # noqa: F401
from torch.utils import _pytree as pytree

__all__ = ["all_gather_dim", "make_gather_fallback"]


def all_gather_dim(x: torch.Tensor, dim: int, group_name: str, size: int) -> torch.Tensor:
    """The global tensor from equal contiguous shards along ``dim`` (differentiable)."""
    moved = x.movedim(dim, 0).contiguous()
    out = torch.ops._c10d_functional.all_gather_into_tensor(moved, size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out).movedim(0, dim)


def make_gather_fallback(target, is_method: bool, gathers: dict[int, int], out_dims, *,
                         group_name: str, rank: int, size: int):
    """A graph-callable that gathers the argument leaves ``gathers`` (leaf index -> dim), runs
    ``target`` and re-shards output leaf ``i`` along ``out_dims[i]`` (``None``: left replicated)."""
    name = target if is_method else getattr(target, "__name__", "op")

    def fallback(*args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        for i, dim in gathers.items():
            leaves[i] = all_gather_dim(leaves[i], dim, group_name, size)
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = getattr(args[0], target)(*args[1:], **kwargs) if is_method else target(*args, **kwargs)
        outs, out_spec = pytree.tree_flatten(out)
        resharded = []
        for o, d in zip(outs, out_dims):
            if d is not None:
                local = o.shape[d] // size
                o = o.narrow(d, rank * local, local)
            resharded.append(o)
        return pytree.tree_unflatten(resharded, out_spec)

    fallback.__name__ = fallback.__qualname__ = f"gather_fallback_{name}"
    fallback.__module__ = __name__
    return fallback
