"""The opt-in gather fallback: run an op without a rule on the all-gathered tensors.

Each sharded argument is all-gathered along its sharded dim (one functional
all_gather per argument, whose backward is a reduce-scatter), the op runs on the
global tensors exactly as on one device, and each output is re-sharded (this
rank keeps its block) or left replicated.  It costs a full copy of every gathered
argument on every rank, which is why it is opt-in and warned about.
"""

from __future__ import annotations

from torch.utils import _pytree as pytree

from ..domain import Domain, all_gather_rows

__all__ = ["make_gather_fallback"]


def make_gather_fallback(
    target, is_method: bool, gathers: dict[int, tuple], out_dims, *, group_name: str, rank: int, size: int
):
    """A graph-callable that gathers the argument leaves ``gathers`` (leaf index -> ``(dim, lengths)``),
    runs ``target`` and re-shards output leaf ``i`` along ``out_dims[i]`` (``None``: left replicated)."""
    domain = Domain(group_name, rank, size)
    name = target if is_method else getattr(target, "__name__", "op")

    def fallback(*args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        for i, (dim, lengths) in gathers.items():
            leaves[i] = all_gather_rows(leaves[i], dim, lengths, group_name)
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = getattr(args[0], target)(*args[1:], **kwargs) if is_method else target(*args, **kwargs)
        outs, out_spec = pytree.tree_flatten(out)
        resharded = []
        for o, d in zip(outs, out_dims):
            if d is not None:
                start, stop = domain.bounds(o.shape[d])
                o = o.narrow(d, start, stop - start)
            resharded.append(o)
        return pytree.tree_unflatten(resharded, out_spec)

    fallback.__name__ = fallback.__qualname__ = f"gather_fallback_{name}"
    fallback.__module__ = __name__
    return fallback
