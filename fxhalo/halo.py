"""The one halo-exchange primitive.

Every op that reaches across a shard edge says which *global* rows each rank
needs, ``[start, stop)`` along the sharded dim.  The range may reach past the
global edges (padding), past a neighbour (multi-hop halos) or fall short of the
local shard (negative halos drop local rows).  :func:`plan_halo` turns that into
a :class:`HaloPlan`: what this rank sends to whom, how many rows it receives from
whom, and how to assemble its extended slab from local rows, received rows and
fill rows.  :func:`halo_exchange` carries the plan out with **one**
``all_to_all_single`` functional collective, so both neighbours (and further
ranks, for wide halos) are served at once and autograd returns each halo row's
gradient to its owner, where it is added into that owner's rows.

Rows outside ``[0, N)`` come from the :class:`Edge`: zeros, a constant, or the
``reflect`` / ``replicate`` / ``circular`` image of a row inside the tensor.  The
image may live on another rank (reflect on a tiny edge shard, circular wraps the
ring); the plan treats it like any other remote row.

Plans depend only on the partition, the needed ranges and the edge, which every
rank knows for every rank, so all ranks agree on whether a collective happens
at all (``HaloPlan.collective``) without talking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)

from .errors import FxHaloError

__all__ = [
    "EDGE_MODES",
    "Edge",
    "Piece",
    "HaloPlan",
    "plan_halo",
    "halo_exchange",
    "send_buffer",
    "assemble",
    "needs_from_widths",
    "observe_halos",
    "Fill",
    "planned_exchange",
    "fetched_rows",
    "exchange_parts",
    "takes_received_rows",
    "takes_received",
]

EDGE_MODES = ("zeros", "constant", "reflect", "replicate", "circular")


@dataclasses.dataclass(frozen=True)
class Edge:
    """What lies beyond the global edges of the sharded dim.

    ``mode`` covers ``extent = (lo, hi)`` rows past each edge (``None``: as many as
    needed); rows further out are zeros.  A convolution fed by ``F.pad(x, p,
    mode)`` has ``Edge(mode, extent=p)`` followed by its own zero padding.
    """

    mode: str = "zeros"
    value: float = 0.0
    extent: tuple[int, int] | None = None

    def __post_init__(self):
        if self.mode not in EDGE_MODES:
            raise FxHaloError(f"unknown edge mode {self.mode!r}; expected one of {EDGE_MODES}")

    def source(self, i: int, n: int) -> int | float:
        """Global row that supplies out-of-range row ``i`` (an ``int``), or a fill value (a ``float``)."""
        below = i < 0
        depth = -i if below else i - (n - 1)  # 1 for the first row past the edge
        if self.extent is not None and depth > self.extent[0 if below else 1]:
            return 0.0
        mode = self.mode
        if mode == "zeros":
            return 0.0
        if mode == "constant":
            return float(self.value)
        if mode == "replicate":
            return 0 if below else n - 1
        if mode == "reflect":
            if depth >= n:
                raise FxHaloError(f"reflect padding of {depth} rows needs more than the {n} rows of the global tensor")
            return depth if below else n - 1 - depth
        # circular
        if depth > n:
            raise FxHaloError(
                f"circular padding of {depth} rows wraps more than once around the {n} rows of the global tensor"
            )
        return i + n if below else i - n


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of rows of the extended slab: ``local`` rows, ``recv`` rows, or ``fill`` rows."""

    kind: str
    start: int
    length: int
    reverse: bool = False
    value: float = 0.0


@dataclasses.dataclass(frozen=True)
class HaloPlan:
    """How one rank builds its extended slab.

    ``send`` lists ``(local_start, length)`` runs in send-buffer order (grouped by
    destination rank, ascending); ``send_splits[q]``/``recv_splits[q]`` count rows
    sent to / received from rank ``q``.  ``pieces`` concatenated along the sharded
    dim give the slab.  ``collective`` is True when any rank sends anything.
    """

    rank: int
    size: int
    lo: int
    hi: int
    local_length: int
    send: tuple[tuple[int, int], ...]
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    pieces: tuple[Piece, ...]
    collective: bool
    #: what the plan was made from (:func:`plan_halo`'s arguments): every rank's rows, every rank's needed
    #: range and the edge, so that the exchange of a block on several mesh axes (:mod:`fxhalo.block_halo`)
    #: can work out what the other ranks of the axis need too
    partition: tuple[tuple[int, int], ...] = ()
    needs: tuple[tuple[int, int], ...] = ()
    edge: Edge = Edge()

    @property
    def rows_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def rows_received(self) -> int:
        return sum(self.recv_splits)

    @property
    def is_identity(self) -> bool:
        """True when the extended slab is exactly the local slab (nothing to do)."""
        return not self.collective and self.pieces == (Piece("local", 0, self.local_length),)


def needs_from_widths(partition, widths) -> tuple[tuple[int, int], ...]:
    """Needed global ranges from per-rank ``(lo, hi)`` widths around each rank's rows."""
    return tuple((a - lo, b + hi) for (a, b), (lo, hi) in zip(partition, widths))


def _runs_for(start: int, stop: int, partition, edge: Edge) -> list[tuple]:
    """The rows ``[start, stop)`` of one rank's slab as runs.

    Each run is ``("row", owner, owner_local_first, length, step)`` or
    ``("fill", value, length)``; rows inside the tensor are taken straight from
    the partition (O(ranks)), rows past the edges one by one (O(halo width)).
    """
    n = partition[-1][1]
    runs: list[list] = []

    def add_row(owner: int, local: int) -> None:
        if runs and runs[-1][0] == "row" and runs[-1][1] == owner:
            run = runs[-1]
            last = run[2] + (run[3] - 1) * run[4]
            step = local - last
            if step in (1, -1) and (run[3] == 1 or step == run[4]):
                run[4] = step
                run[3] += 1
                return
        runs.append(["row", owner, local, 1, 1])

    def add_fill(value: float, length: int) -> None:
        if runs and runs[-1][0] == "fill" and runs[-1][1] == value:
            runs[-1][2] += length
        else:
            runs.append(["fill", value, length])

    def add_global_row(g: int) -> None:
        for owner, (a, b) in enumerate(partition):
            if a <= g < b:
                add_row(owner, g - a)
                return
        raise AssertionError(f"row {g} has no owner in {partition}")

    def add_outside(i: int) -> None:
        src = edge.source(i, n)
        if isinstance(src, float):
            add_fill(src, 1)
        else:
            add_global_row(src)

    for i in range(start, min(stop, 0)):
        add_outside(i)
    lo, hi = max(start, 0), min(stop, n)
    for owner, (a, b) in enumerate(partition):
        s, e = max(lo, a), min(hi, b)
        if s < e:
            # Rows of one owner are contiguous and ascending: add them as one run.
            if (
                runs
                and runs[-1][0] == "row"
                and runs[-1][1] == owner
                and runs[-1][4] == 1
                and runs[-1][2] + runs[-1][3] == s - a
            ):
                runs[-1][3] += e - s
            else:
                runs.append(["row", owner, s - a, e - s, 1])
    for i in range(max(start, n), stop):
        add_outside(i)
    return [tuple(r) for r in runs]


@functools.lru_cache(maxsize=4096)
def plan_halo(
    partition: tuple[tuple[int, int], ...], needs: tuple[tuple[int, int], ...], rank: int, edge: Edge = Edge()
) -> HaloPlan:
    """Plan the exchange that gives every rank ``r`` the global rows ``needs[r]``.

    ``partition[q]`` is rank ``q``'s ``[start, stop)`` of the input's global rows.
    Pure and cached: the same arguments give the same plan on every rank.
    """
    size = len(partition)
    if len(needs) != size:
        raise AssertionError("one needed range per rank")
    for r, (s, e) in enumerate(needs):
        if e < s:
            raise FxHaloError(f"rank {r} would need a negative number of rows ({s}..{e})")
    all_runs = [_runs_for(s, e, partition, edge) for s, e in needs]

    # Rank q's send buffer to rank r: r's runs owned by q, in r's order, rows ascending.
    def sends_of(q: int) -> list[list[tuple[int, int]]]:
        per_dest = []
        for r in range(size):
            per_dest.append(
                [
                    (min(run[2], run[2] + (run[3] - 1) * run[4]), run[3])
                    for run in all_runs[r]
                    if run[0] == "row" and run[1] == q and q != r
                ]
            )
        return per_dest

    my_sends = sends_of(rank)
    send_splits = tuple(sum(length for _, length in runs) for runs in my_sends)
    collective = any(run[0] == "row" and run[1] != r for r in range(size) for run in all_runs[r])

    recv_splits = [0] * size
    for run in all_runs[rank]:
        if run[0] == "row" and run[1] != rank:
            recv_splits[run[1]] += run[3]
    chunk_start = [sum(recv_splits[:q]) for q in range(size)]
    within = [0] * size
    pieces = []
    for run in all_runs[rank]:
        if run[0] == "fill":
            pieces.append(Piece("fill", 0, run[2], value=run[1]))
            continue
        _, owner, first, length, step = run
        reverse = step == -1 and length > 1
        if owner == rank:
            low = first if not reverse else first - (length - 1)
            pieces.append(Piece("local", low, length, reverse))
        else:
            pieces.append(Piece("recv", chunk_start[owner] + within[owner], length, reverse))
            within[owner] += length

    a, b = partition[rank]
    s, e = needs[rank]
    return HaloPlan(
        rank=rank,
        size=size,
        lo=a - s,
        hi=e - b,
        local_length=b - a,
        send=tuple(run for runs in my_sends for run in runs),
        send_splits=send_splits,
        recv_splits=tuple(recv_splits),
        pieces=tuple(pieces),
        collective=collective,
        partition=tuple(partition),
        needs=tuple(needs),
        edge=edge,
    )


# -- observers: who wants to hear of each exchange (fxhalo.explain's halo column) ----------------

_OBSERVERS: list[Callable] = []


@contextlib.contextmanager
def observe_halos(callback: Callable[[HaloPlan, object], None]):
    """Call ``callback(plan, edge)`` for each halo exchange carried out inside the block.

    Both exchange paths build their send rows with :func:`send_buffer`, which tells the
    observers: :func:`halo_exchange` when its plan needs a collective, and the fused
    norm exchange (:func:`fxhalo.ops.reduce.global_moments_with_rows`) always.  ``edge``
    is what the kernel says fills the rows past the global edges: the :class:`Edge`
    of its plan, a word for a fill no ``Edge`` names (``"clamp"``, ``"-inf"``), or
    ``None`` when the kernel does not say.  Without an observer this costs one test
    of an empty list per exchange.
    """
    _OBSERVERS.append(callback)
    try:
        yield callback
    finally:
        _OBSERVERS.remove(callback)


def _notify(plan: HaloPlan, edge) -> None:
    for callback in tuple(_OBSERVERS):
        callback(plan, edge)


def send_buffer(x: torch.Tensor, dim: int, plan: HaloPlan, edge=None) -> torch.Tensor:
    """The rows this rank sends, rows first (``movedim(dim, 0)``), grouped by destination in rank
    order: ``plan.send_splits[q]`` rows for rank ``q``.

    The one builder of send rows, so the one place that tells the halo observers
    (:func:`observe_halos`) of an exchange, with its ``edge``.
    """
    if _OBSERVERS:
        _notify(plan, edge)
    runs = [x.narrow(dim, s, n).movedim(dim, 0) for s, n in plan.send] or [x.narrow(dim, 0, 0).movedim(dim, 0)]
    return torch.cat(runs, 0) if len(runs) > 1 else runs[0].contiguous()


def assemble(x: torch.Tensor, recv: torch.Tensor | None, dim: int, plan: HaloPlan) -> torch.Tensor:
    """The extended slab from the local rows ``x`` and the received rows ``recv`` (along ``dim``).

    ``recv`` holds the rows from every source rank in rank order, as
    :func:`halo_exchange`'s collective delivers them; ``None`` when nothing was exchanged.
    """
    parts = []
    for p in plan.pieces:
        if p.kind == "local":
            t = x.narrow(dim, p.start, p.length)
        elif p.kind == "recv":
            t = recv.narrow(dim, p.start, p.length)
        else:
            shape = list(x.shape)
            shape[dim] = p.length
            t = x.new_full(shape, p.value)
        parts.append(t.flip(dim) if p.reverse else t)
    if recv is not None and plan.rows_received == 0:
        # The (empty) received buffer feeds the result on every rank: then every rank's
        # autograd graph reaches the collective, and every rank joins the backward
        # all_to_all (a rank missing it would hang the others).
        parts.append(recv)
    if not parts:  # this rank needs no rows at all
        return x.narrow(dim, 0, 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


@dataclasses.dataclass(frozen=True)
class Fill:
    """Constant rows at the two ends of dim ``dim``: ``lo`` rows of ``lo_value`` first, ``hi`` rows of
    ``hi_value`` last (the zeros a transposed conv puts around its input's block, the padding an
    exchange puts past the global edges)."""

    dim: int
    lo: int
    lo_value: float
    hi: int
    hi_value: float

    def strip(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.lo, t.shape[self.dim] - self.lo - self.hi)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        parts = []
        for rows, value in ((self.lo, self.lo_value), (None, None), (self.hi, self.hi_value)):
            if rows is None:
                parts.append(t)
            elif rows:
                shape = list(t.shape)
                shape[self.dim] = rows
                parts.append(t.new_full(shape, value))
        return torch.cat(parts, self.dim) if len(parts) > 1 else t


def halo_exchange(x: torch.Tensor, dim: int, plan: HaloPlan, group_name: str, *, edge=None) -> torch.Tensor:
    """Build this rank's extended slab of ``x`` along ``dim`` according to ``plan``.

    One ``_c10d_functional.all_to_all_single`` carries every halo row; nothing is
    communicated when no rank needs a remote row.  Differentiable.  ``edge`` only
    describes the fill past the global edges to the halo observers (:func:`observe_halos`);
    the plan already holds the rows.  (Several dims at once, a block's halo on a mesh:
    :func:`fxhalo.block_halo.block_exchange`.)
    """
    fetched = fetched_rows((plan,))
    if fetched is not None:
        return assemble_fetched(x, fetched, dim, plan)
    if plan.is_identity:
        return x
    if x.is_complex() and plan.collective:  # collectives take real tensors: exchange the real view
        real = halo_exchange(torch.view_as_real(x.resolve_conj()), dim % x.ndim, plan, group_name, edge=edge)
        return torch.view_as_complex(real)
    recv = None
    if plan.collective:
        recv = torch.ops._c10d_functional.all_to_all_single(
            send_buffer(x, dim, plan, edge), list(plan.recv_splits), list(plan.send_splits), group_name
        )
        recv = torch.ops._c10d_functional.wait_tensor(recv).movedim(0, dim)
    return assemble(x, recv, dim, plan)


def exchange_parts(x: torch.Tensor, dim: int, plan: HaloPlan, edge=None):
    """:func:`halo_exchange`'s collective taken apart, for a producer that sends more in the same one
    (:func:`fxhalo.ops.moments.global_moments_with_rows`): ``(sends, recv_numels, received)``.
    ``sends[q]`` is the rows for rank ``q``, flat; ``recv_numels[q]`` how many elements come from
    ``q``; ``received(chunks)`` turns what came from each rank into the received rows as
    :func:`assemble` takes them."""
    rows = send_buffer(x, dim, plan, edge)
    rest = [n for i, n in enumerate(x.shape) if i != dim]
    per_row = math.prod(rest)
    sends = [r.reshape(-1) for r in rows.split(list(plan.send_splits))]

    def received(chunks):
        return torch.cat([c.view(n, *rest) for c, n in zip(chunks, plan.recv_splits)], 0).movedim(0, dim)

    return sends, [n * per_row for n in plan.recv_splits], received


# -- rows that a fused producer fetched (fxhalo.passes.fuse) ------------------------------------------
#
# A norm whose output feeds a halo op through row-wise ops can fetch that op's halo rows with its
# own statistics, in one collective.  The pass needs two things from the halo op's kernel, and asks the
# kernel itself rather than a table of ops, so the rows always follow from the op's own geometry:
# *which* rows it would exchange (:func:`planned_exchange`: the kernel runs on the graph's example
# values until its exchange, which then reports its plan instead of communicating), and a way to hand
# it those rows ready-made (:func:`takes_received_rows`: the kernel's one exchange assembles them).

_PLANNING: list[bool] = []  # non-empty inside planned_exchange
_RECEIVED: list[list] = []  # one [(rows, needs)] slot per kernel call given halo_rows; [None] once used


class _Planned(Exception):
    """What the exchange inside :func:`planned_exchange` would have done: one plan per mesh axis of the
    kernel's ``axes`` (``None`` for an axis whose rows the block takes as they are)."""

    def __init__(self, plans: tuple[HaloPlan | None, ...]):
        super().__init__("planned")
        self.plans = plans


def planned_exchange(kernel: Callable, args: tuple, kwargs: dict) -> tuple[HaloPlan | None, ...] | None:
    """The plans of the first halo exchange ``kernel(*args, **kwargs)`` makes, one per mesh axis of its
    ``axes`` (``None``: that axis's rows are taken as they are), or ``None`` when it makes none.

    The kernel runs up to that exchange only; pass fake tensors (the graph's example values), inside
    their fake mode.
    """
    _PLANNING.append(True)
    try:
        kernel(*args, **kwargs)
    except _Planned as planned:
        return planned.plans
    finally:
        _PLANNING.pop()
    return None


def fetched_rows(plans: tuple[HaloPlan | None, ...]):
    """The exchange of ``plans`` (one per mesh axis, as :func:`planned_exchange` gives them) is about to
    run: inside :func:`planned_exchange` it reports them instead; in a kernel handed ``halo_rows=``,
    returns those rows (checked against the plans' needs); else ``None``, and the exchange runs."""
    if _PLANNING:
        raise _Planned(plans)
    if not _RECEIVED or _RECEIVED[-1][0] is None:
        return None
    slot = _RECEIVED[-1]
    (received, needs), slot[0] = slot[0], None
    mine = tuple(None if p is None else p.needs for p in plans)
    if needs != mine:
        # The pass planned the producer's exchange from this kernel's plans; they cannot differ unless the
        # two were planned from different shapes, and then the rows would be the wrong ones.
        raise AssertionError(f"the fused producer fetched the rows {needs}, the kernel needs {mine}")
    return received


def assemble_fetched(x: torch.Tensor, fetched: torch.Tensor, dim: int, plan: HaloPlan) -> torch.Tensor:
    """:func:`assemble` with rows a fused producer fetched (:func:`fetched_rows`)."""
    if fetched.shape[dim] != plan.rows_received:
        raise AssertionError(f"{fetched.shape[dim]} rows fetched, the plan receives {plan.rows_received}")
    return assemble(x, fetched, dim, plan)


def takes_received_rows(kernel: Callable) -> Callable:
    """Let ``kernel`` take ``halo_rows=`` and ``halo_needs=``: the rows its (first) halo exchange receives,
    fetched already by a producer in the collective that carried its own data
    (:func:`fxhalo.ops.norm.group_norm_exchange`), as that exchange's collective would deliver them
    (:func:`exchange_parts`, :func:`fxhalo.block_halo.block_parts`), and, per mesh axis, every rank's
    needed rows the producer planned them for (:attr:`HaloPlan.needs`, ``None`` for an axis taken as
    it is; checked against the kernel's own plans).  That exchange then only assembles.

    The one switch for every halo kernel: the conv, the transposed conv, the pools and the interpolation
    go through :func:`halo_exchange`, which looks for the rows here."""

    @functools.wraps(kernel)
    def call(*args, halo_rows=None, halo_needs=None, **kwargs):
        if halo_rows is None:
            return kernel(*args, **kwargs)
        needs = tuple(None if n is None else tuple(tuple(r) for r in n) for n in halo_needs)
        slot = [(halo_rows, needs)]
        _RECEIVED.append(slot)
        try:
            out = kernel(*args, **kwargs)
        finally:
            _RECEIVED.pop()
        if slot[0] is not None:
            raise AssertionError(f"{kernel.__qualname__} made no halo exchange for the rows it was handed")
        return out

    call.fxhalo_takes_received_rows = True
    return call


def takes_received(kernel) -> bool:
    """Was ``kernel`` made by :func:`takes_received_rows`?"""
    return getattr(kernel, "fxhalo_takes_received_rows", False)
