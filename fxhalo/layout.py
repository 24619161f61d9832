"""How a value in the graph is laid out over the domain: sharded along one dim, or replicated.

The propagation pass stores a :class:`Sharded` (or ``None`` for replicated) under
``node.meta[SHARDING]`` for every node; rules and later passes read it from there.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Sharded", "SHARDING", "split", "sharding_of", "example_value"]

SHARDING = "fxhalo_sharding"


@dataclasses.dataclass(frozen=True)
class Sharded:
    """Sharded along tensor dim ``dim``: this rank holds ``local`` of the dim's ``length`` global entries.

    Usually the rank holds one contiguous block of rows.  A reshape can merge
    the sharded dim with other dims.  Dims merged *inside* it keep each rank's
    entries one contiguous block (a plain shard of a longer dim).  A dim of size
    ``outer`` merged *outside* it interleaves them: the merged dim reads ``outer``
    blocks, and the rank holds one slice of each (``B*h*w`` windows after a Swin
    window partition, say).  Ops that act entry by entry or window by window do
    not care; windowed ops along the dim need ``contiguous``.
    """

    dim: int
    local: int
    length: int
    outer: int = 1

    @property
    def contiguous(self) -> bool:
        return self.outer == 1

    @property
    def block(self) -> tuple[int, int]:
        """``(local, global)`` size of the sharded factor itself, without ``outer``."""
        return self.local // self.outer, self.length // self.outer

    def moved(self, dim: int) -> Sharded:
        return dataclasses.replace(self, dim=dim)

    def same_layout(self, other: Sharded) -> bool:
        """Equal up to which dim the sharding sits on."""
        return (self.local, self.length, self.outer) == (other.local, other.length, other.outer)

    def __str__(self) -> str:
        extra = f", outer={self.outer}" if self.outer != 1 else ""
        return f"S(dim={self.dim}, {self.local}/{self.length}{extra})"


def split(dim: int, length: int, domain, outer: int = 1) -> Sharded:
    """The layout of a global ``length`` split along ``dim`` by the partition rule, on this rank."""
    return Sharded(dim, domain.local_length(length), length, outer)


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
