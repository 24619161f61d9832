"""How a value in the graph is laid out over the domain: sharded along one dim, or replicated.

The propagation pass stores a :class:`Sharded` (or ``None`` for replicated) under
``node.meta[SHARDING]`` for every node; rules and later passes read it from there.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Sharded", "SHARDING", "sharding_of", "example_value"]

SHARDING = "fxhalo_sharding"


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Sharded along tensor dim ``dim``: this rank holds ``local`` of ``length`` global rows."""

    dim: int
    local: int
    length: int

    def __str__(self) -> str:
        return f"S(dim={self.dim}, {self.local}/{self.length})"


def sharding_of(arg) -> Sharded | None:
    """The sharding recorded for an FX node (``None`` for replicated values and non-nodes)."""
    meta = getattr(arg, "meta", None)
    return meta.get(SHARDING) if meta is not None else None


def example_value(node):
    """The fake value Dynamo (or our meta refresh) recorded for ``node``, if any."""
    meta = node.meta
    val = meta.get("val", meta.get("example_value"))
    return val


def is_tensor_node(arg) -> bool:
    return hasattr(arg, "meta") and isinstance(example_value(arg), torch.Tensor)
