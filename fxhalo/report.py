"""The report model of :func:`fxhalo.explain` and of the backend's log: rows, collectives, the table.

An :class:`Explanation` holds one :class:`Part` per Dynamo graph, each a list of
:class:`Row` objects (one per kernel the backend inserted or node it refused) and the
count of the nodes that run on the slab unchanged.  How the rows are measured is
:mod:`fxhalo.measure`; the byte conventions are in :mod:`fxhalo.explain`'s docstring.
"""

from __future__ import annotations

import collections
import dataclasses

import tabulate
import torch

__all__ = ["Collective", "Row", "Explanation"]

_ORDER = {kind: i for i, kind in enumerate(("all_to_all", "all_reduce", "all_gather", "reduce_scatter"))}


# -- what one row says ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective a kernel issued in the forward (:mod:`fxhalo.explain` defines ``bytes``)."""

    kind: str  # "all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast"
    bytes: int  # sent by this rank, per call
    received: int  # received by this rank, per call
    requires_grad: bool  # autograd will run its backward
    group_size: int = 1
    #: on a mesh of several axes, the one it runs along (the axis's name), or "whole" (every rank of the
    #: domain axes); "" on a one-axis domain
    axis: str = ""

    def backward(self) -> Collective | None:
        """The collective autograd runs for this one in the backward (the module's convention)."""
        if not self.requires_grad:
            return None
        size, axis = self.group_size, self.axis
        if self.kind == "all_to_all":
            return Collective("all_to_all", self.received, self.bytes, False, size, axis)
        if self.kind == "all_reduce":
            return Collective("all_reduce", self.bytes, self.bytes, False, size, axis)
        if self.kind == "all_gather":
            return Collective("reduce_scatter", self.bytes * size, self.bytes, False, size, axis)
        if self.kind == "reduce_scatter":
            return Collective("all_gather", self.received, self.bytes, False, size, axis)
        return None

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.axis}]" if self.axis else self.kind


@dataclasses.dataclass(frozen=True)
class Row:
    """One node the backend marked: a kernel call it inserted, or a node it refused."""

    graph: int
    node: str  # the node's name before the rewrite
    op: str  # the op as the user's code spelled it (torch.conv2d, torch.nn.functional.group_norm, ...)
    kernel: str  # the fxhalo kernel that replaced it ("" for a refusal)
    source: str  # file:line in the user's code
    shard_dim: int | tuple[int, ...] | None  # a tuple: the dims of a kernel along several mesh axes
    #: (lo, hi) rows of each halo exchange, fill rows included; on several axes one per axis, in order
    halo: tuple[tuple[int, int], ...] = ()
    edge: str = ""
    collectives: tuple[Collective, ...] = ()
    backward: tuple[Collective, ...] = ()
    error: str = ""  # the FxHaloError of a refused node
    #: moves of the shard between dims (FFTs, attention by heads, fxhalo.redistribute): the least this
    #: rank can send for them, from the partitions (its slabs less the pieces it keeps); None: no move
    minimum: int | None = None

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes for c in self.collectives)

    @property
    def refused(self) -> bool:
        return bool(self.error)

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "node": self.node,
            "op": self.op,
            "kernel": self.kernel,
            "source": self.source,
            "shard_dim": self.shard_dim,
            "halo": [list(h) for h in self.halo],
            "edge": self.edge,
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
            "backward": [dataclasses.asdict(c) for c in self.backward],
            "bytes_sent": self.bytes_sent,
            "error": self.error,
            "minimum": self.minimum,
        }


@dataclasses.dataclass
class Part:
    """One Dynamo graph, explained."""

    index: int
    graph: torch.fx.GraphModule | None
    rows: list[Row]
    local: collections.Counter  # op -> how many nodes of it run locally on the slab


class Explanation:
    """What the backend does for one rank: :attr:`table`, :attr:`graph`, :attr:`summary`, :meth:`to_dict`."""

    def __init__(self, *, world_size, rank: int, shard_dim, parts: list[Part], notes: list[str]):
        # on a mesh of several domain axes: world_size is the mesh's shape, shard_dim one dim per axis
        self.world_size, self.rank, self.shard_dim = world_size, rank, shard_dim
        self._parts = parts
        self.notes = notes

    # -- contents ------------------------------------------------------------
    @property
    def graphs(self) -> list[torch.fx.GraphModule]:
        """The rewritten graphs, one per Dynamo graph (more than one after a graph break)."""
        return [p.graph for p in self._parts if p.graph is not None]

    @property
    def graph(self) -> torch.fx.GraphModule | None:
        """The rewritten GraphModule (the first, when graph breaks gave several; see :attr:`graphs`)."""
        graphs = self.graphs
        return graphs[0] if graphs else None

    @property
    def rows(self) -> list[Row]:
        return [r for p in self._parts for r in p.rows]

    @property
    def problems(self) -> list[Row]:
        """Rows of refused nodes (and of models torch could not trace): each makes the backend refuse."""
        return [r for r in self.rows if r.refused]

    @property
    def local_nodes(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for p in self._parts:
            total.update(p.local)
        return total

    def forward(self) -> list[Collective]:
        return [c for r in self.rows for c in r.collectives]

    def backward(self) -> list[Collective]:
        return [c for r in self.rows for c in r.backward]

    # -- text ----------------------------------------------------------------
    @property
    def table(self) -> str:
        """A ``tabulate`` table: one row per marked node, then one line counting the local ones."""
        several = len(self._parts) > 1
        errors = any(r.refused for r in self.rows)
        headers = (["graph"] if several else []) + [
            "node",
            "op",
            "source",
            "dim",
            "halo lo/hi",
            "edge",
            "collective",
            "bytes sent",
        ]
        moves = any(r.minimum is not None for r in self.rows)
        headers += ["move minimum"] if moves else []
        headers += ["problem"] if errors else []
        body = []
        for r in self.rows:
            cells = [
                r.node,
                r.op,
                r.source or "-",
                _dims(r.shard_dim),
                ", ".join(f"{lo}/{hi}" for lo, hi in r.halo) or "-",
                r.edge or "-",
                "REFUSED" if r.refused else _kinds(r),
                "" if r.refused else f"{r.bytes_sent:,}",
            ]
            cells += [_minimum(r)] if moves else []
            cells += [r.error] if errors else []
            body.append(([r.graph] if several else []) + cells)
        widths = [None] * (len(headers) - 1) + [72 if errors else None]
        text = (
            tabulate.tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True, maxcolwidths=widths)
            if body
            else "(no node needs a collective)"
        )
        return f"{text}\n{self._local_line()}"

    def _local_line(self) -> str:
        local = self.local_nodes
        if not local:
            return "local: none"
        kinds = ", ".join(f"{n} x {op}" for op, n in local.most_common())
        n = sum(local.values())
        return f"local: {n} {'node needs' if n == 1 else 'nodes need'} no collective ({kinds})"

    @property
    def summary(self) -> str:
        """Collectives and bytes per forward (and per backward when anything requires grad)."""
        graphs = len(self._parts)
        size = self.world_size
        of = " x ".join(map(str, size)) + " mesh" if isinstance(size, tuple) else f"{size}"
        lines = [f"rank {self.rank} of {of}, shard_dim {self.shard_dim}, {graphs} graph{'s' if graphs != 1 else ''}"]
        lines.append("forward:  " + totals(self.forward()))
        back = self.backward()
        if back:
            lines.append("backward: " + totals(back))
        axes = list(dict.fromkeys(c.axis for c in self.forward() + back if c.axis))
        for axis in axes:  # on a mesh: what runs along each axis, forward and backward together
            along = [c for c in self.forward() + back if c.axis == axis]
            lines.append(f"  along {axis}: " + totals(along, per="forward + backward"))
        problems = self.problems
        if problems:
            lines.append(
                f"REFUSED: {len(problems)} problem{'s' if len(problems) != 1 else ''}; the backend "
                "would raise the first of them (FxHaloError) instead of compiling"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table}\n\n{self.summary}"

    def __repr__(self) -> str:
        return (
            f"<Explanation rank {self.rank} of {self.world_size}: {len(self.rows)} rows, "
            f"{len(self.forward())} forward collectives>"
        )

    def to_dict(self) -> dict:
        """Everything in JSON-ready form (no tensors, no graph objects; the graphs as code)."""
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "shard_dim": self.shard_dim,
            "rows": [r.to_dict() for r in self.rows],
            "local_nodes": dict(self.local_nodes),
            "forward": _totals_dict(self.forward()),
            "backward": _totals_dict(self.backward()),
            "problems": len(self.problems),
            "graphs": [g.code for g in self.graphs],
            "notes": list(self.notes),
        }


def _minimum(row: Row) -> str:
    """A move's analytic minimum and the ratio of the bytes sent to it (1.00: nothing extra)."""
    if row.minimum is None:
        return "-"
    return f"{row.minimum:,} ({row.bytes_sent / row.minimum:.2f}x)" if row.minimum else f"{row.minimum}"


def _kinds(row: Row) -> str:
    if row.collectives:
        return "+".join(c.label for c in row.collectives)
    if row.backward:  # a gradient sync: nothing in the forward
        return "backward " + "+".join(c.label for c in row.backward)
    return "none"


def _dims(shard_dim) -> str:
    if shard_dim is None:
        return "-"
    return ",".join(map(str, shard_dim)) if isinstance(shard_dim, tuple) else str(shard_dim)


def totals(calls: list[Collective], per: str = "call") -> str:
    if not calls:
        return "no collectives"
    by_kind: dict[str, list[int]] = {}
    for c in sorted(calls, key=lambda c: _ORDER.get(c.kind, len(_ORDER))):
        entry = by_kind.setdefault(c.kind, [0, 0])
        entry[0] += 1
        entry[1] += c.bytes
    kinds = ", ".join(f"{n} x {kind} ({_human(b)})" for kind, (n, b) in by_kind.items())
    total = sum(c.bytes for c in calls)
    return (
        f"{len(calls)} collective{'s' if len(calls) != 1 else ''} per {per}: {kinds}; {_human(total)} sent by this rank"
    )


def _totals_dict(calls: list[Collective]) -> dict:
    kinds: dict[str, dict] = {}
    for c in calls:
        entry = kinds.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return {"collectives": len(calls), "bytes": sum(c.bytes for c in calls), "by_kind": kinds}


def _human(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n} B"  # pragma: no cover
