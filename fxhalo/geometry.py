"""Halo arithmetic for windowed ops along one dim (shared/DESIGN.md section 4).

An op with kernel ``k``, dilation ``d``, stride ``s`` and padding ``pl``/``pr``
maps a global input length ``N`` to ``M = floor((N + pl + pr - d(k-1) - 1)/s) + 1``
output rows, and output row ``o`` reads input rows ``o*s - pl ... o*s - pl + d(k-1)``.
A rank that owns output rows ``[c, e)`` therefore needs input rows
``[c*s - pl, (e-1)*s - pl + d(k-1) + 1)``; the halo plan does the rest.
"""

from __future__ import annotations

import dataclasses

from .domain import Domain
from .errors import FxHaloError
from .halo import Edge, HaloPlan, plan_halo

__all__ = ["TooShort", "Unsplittable", "Window", "WindowPlan", "plan_window", "split_rows"]


class Unsplittable(FxHaloError):
    """An op fxhalo cannot split exactly.  ``problem`` reads after "it" in a rule's refusal."""

    def __init__(self, what: str, problem: str, remedy: str):
        super().__init__(f"{what}: it {problem}. Remedy: {remedy}.")
        self.problem = problem
        self.remedy = remedy


def split_rows(domain: Domain, n: int, m: int, what: str):
    """``(input partition, output partition)`` of an op mapping ``n`` global rows to ``m``.

    The input's partition is ``n``'s (balanced, or the one a
    :class:`~fxhalo.domain.Partitioned` carries).  An output as long as the input
    keeps the input's partition, row for row; any other length is split by the
    balanced rule, so shards may differ by a row.  A rank with no
    rows at all is refused: most local ops cannot run on an empty slab, and a
    layer that small gains nothing from being sharded.
    """
    if m < 1:
        raise Unsplittable(
            what,
            f"gives no output rows from the global input length {n}",
            "check the op's arguments against the global (not the local) size",
        )
    for length, which in ((n, "input"), (m, "output")):
        if length < domain.size:
            raise TooShort(
                what,
                f"has a global {which} length of {length} rows along the sharded dim, fewer than the "
                f"{domain.size} ranks, so some ranks would hold no rows",
                "use fewer ranks, or stop sharding before this layer (gather its input with fxhalo.gather, "
                "or mark it replicated), as the deepest levels of a UNet often need",
            )
    in_part = domain.partition(n)
    if any(a == b for a, b in in_part):
        raise TooShort(
            what,
            f"reads a tensor partitioned as {[b - a for a, b in in_part]} rows along the sharded dim, "
            "so some ranks hold no rows",
            "give every rank at least one row (fxhalo.from_local with other lengths)",
        )
    return in_part, (in_part if int(m) == int(n) else domain.partition(m))


class TooShort(Unsplittable):
    """The sharded dim is too short for every rank to hold a row.  The global view computes such a
    layer replicated instead (:mod:`fxhalo.passes.localize`); the plain path refuses it."""


@dataclasses.dataclass(frozen=True)
class Window:
    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_lo: int = 0
    pad_hi: int = 0

    @property
    def span(self) -> int:
        """Distance from the first to the last input row one output row reads."""
        return self.dilation * (self.kernel - 1)

    def out_length(self, n: int) -> int:
        return (n + self.pad_lo + self.pad_hi - self.span - 1) // self.stride + 1

    def needed(self, c: int, e: int) -> tuple[int, int]:
        """Global input rows ``[start, stop)`` read by output rows ``[c, e)``."""
        return c * self.stride - self.pad_lo, (e - 1) * self.stride - self.pad_lo + self.span + 1


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """A windowed op on one sharded dim: this rank's halo plan and the global output length.

    ``local`` is True when every rank's outputs read exactly its own input rows:
    the op then needs no exchange at all (a 1-wide kernel, or a patchify conv
    whose stride divides the shard), which is how fxhalo *proves* a conv local.
    """

    halo: HaloPlan
    out_length: int
    local: bool
    #: the widest halo any rank needs on one side, and the smallest input shard
    reach: int = 0
    shard: int = 0


def plan_window(window: Window, domain: Domain, n_global: int, edge: Edge, what: str) -> WindowPlan:
    """Plan a windowed op on a sharded dim of global length ``n_global``."""
    m = window.out_length(n_global)
    in_part, out_part = split_rows(domain, n_global, m, what)
    needs = tuple(window.needed(c, e) for c, e in out_part)
    reach = max(max(a - s, e - b) for (a, b), (s, e) in zip(in_part, needs))
    return WindowPlan(
        plan_halo(in_part, needs, domain.rank, edge), m, needs == in_part, reach, min(b - a for a, b in in_part)
    )
