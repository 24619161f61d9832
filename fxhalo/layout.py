"""How a value in the graph is laid out over the domain: a :class:`Layout`, one entry per mesh axis.

The domain is a mesh of one or more axes (:mod:`fxhalo.mesh`).  Along each mesh axis a
value is sharded, splitting one tensor dim over that axis's ranks
(:class:`Sharded`), replicated (``None``), or a partial sum that the axis's ranks
add up to (:class:`Partial`, after a product that contracts the sharded dim).  The propagation pass stores a
:class:`Layout` under ``node.meta[LAYOUT]`` for every node (a tuple-valued node,
such as ``max_pool(..., return_indices=True)``, gets an :class:`Items` of one
layout per item); rules and later passes read it from there.

Words: an *axis* is a mesh axis, a *dim* a tensor dim.

The rules read a layout through :func:`sharding_of`, the one-axis view: the
:class:`Sharded` entry (or ``None`` when the value is replicated), and return their
output in the same view, which the propagation pass turns back into a :class:`Layout`
(:func:`as_layout`).  On a domain of several mesh axes the propagation asks each rule
once per axis, inside :func:`axis_view`, where the one-axis view is that axis's entry
(:mod:`fxhalo.passes.propagate`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from fractions import Fraction

import torch

from .domain import explicit_lengths

__all__ = [
    "GLOBAL_VALUE",
    "LAYOUT",
    "PARTIAL",
    "Items",
    "Layout",
    "Partial",
    "Sharded",
    "as_layout",
    "axis_view",
    "example_value",
    "global_shape_of",
    "is_tensor_node",
    "layout_of",
    "resized",
    "sharding_of",
    "shared_dims",
    "split",
    "split_axes",
    "whole_entry",
]

#: node.meta key: the node's :class:`Layout` (or :class:`Items`)
LAYOUT = "fxhalo_layout"
#: node.meta key: the example value Dynamo traced at global shapes (the global view,
#: :mod:`fxhalo.passes.localize`)
GLOBAL_VALUE = "fxhalo_global_value"


@dataclasses.dataclass(frozen=True)
class Sharded:
    """One mesh axis's entry: sharded along tensor dim ``dim``; this rank holds ``local`` of the dim's
    ``global_length`` entries.

    Usually the rank holds one contiguous block of rows.  A reshape can merge
    the sharded dim with other dims.  Dims merged *inside* it keep each rank's
    entries one contiguous block (a plain shard of a longer dim).  A dim of size
    ``outer`` merged *outside* it interleaves them: the merged dim reads ``outer``
    blocks, and the rank holds one slice of each (``B*h*w`` windows after a Swin
    window partition, say).  Ops that act entry by entry or window by window do
    not care; windowed ops along the dim need ``contiguous``.

    ``global_length`` is a :class:`~fxhalo.domain.Partitioned` when the partition
    is not the balanced one (a DomainTensor's, or an op's output that kept it).
    """

    dim: int
    local: int
    global_length: int
    outer: int = 1

    @property
    def contiguous(self) -> bool:
        return self.outer == 1

    @property
    def block(self) -> tuple[int, int]:
        """``(local, global)`` size of the sharded factor itself, without ``outer``."""
        return self.local // self.outer, self.global_length // self.outer

    def moved(self, dim: int) -> Sharded:
        return dataclasses.replace(self, dim=dim)

    @property
    def lengths(self) -> tuple[int, ...] | None:
        """Every rank's length when the partition is explicit; ``None`` for the balanced rule."""
        return explicit_lengths(self.global_length)

    def same_layout(self, other: Sharded) -> bool:
        """Equal up to which dim the sharding sits on."""
        return (self.local, int(self.global_length), self.outer, self.lengths) == (
            other.local,
            int(other.global_length),
            other.outer,
            other.lengths,
        )

    def __str__(self) -> str:
        extra = f", outer={self.outer}" if self.outer != 1 else ""
        parts = f", partition={list(self.lengths)}" if self.lengths is not None else ""
        return f"S(dim={self.dim}, {self.local}/{int(self.global_length)}{extra}{parts})"


@dataclasses.dataclass(frozen=True)
class Partial:
    """One mesh axis's entry: every rank holds a *summand* of the value, at the value's whole shape; the
    value is their sum over the axis's ranks.

    A product that contracts the sharded dim leaves it (each rank multiplies its rows).
    Ops that are linear in it keep it (:mod:`fxhalo.rules.partial`), so a chain of
    them costs one sum, where the value is first needed whole (an all-reduce) or
    sharded again (a reduce-scatter).  Its gradient on every rank is the whole
    value's gradient.  Rules never see it: the propagation sums it before any other op.
    """

    def __str__(self) -> str:
        return "Partial(sum)"


#: the one :class:`Partial` entry
PARTIAL = Partial()


@dataclasses.dataclass(frozen=True)
class Layout:
    """A value's layout: for each mesh axis of the domain, :class:`Sharded`, :class:`Partial` or ``None``
    (replicated)."""

    axes: tuple[Sharded | Partial | None, ...]

    @classmethod
    def replicated(cls, n_axes: int = 1) -> Layout:
        return cls((None,) * n_axes)

    @property
    def is_sharded(self) -> bool:
        return any(a is not None for a in self.axes)

    def one_axis(self) -> Sharded | Partial | None:
        """The entry of the one sharded (or partial) mesh axis (``None``: replicated on every axis); inside
        :func:`axis_view`, the entry of that axis."""
        axis = _AXIS.get()
        if axis is not None:
            return self.axes[axis]
        sharded = [a for a in self.axes if a is not None]
        if len(sharded) > 1:
            raise NotImplementedError(f"a value sharded over several mesh axes ({self}) needs a multi-axis rule")
        return sharded[0] if sharded else None

    def __str__(self) -> str:
        return ", ".join("R" if a is None else str(a) for a in self.axes)


#: the mesh axis whose entry :meth:`Layout.one_axis` answers with, inside :func:`axis_view`
_AXIS: contextvars.ContextVar[int | None] = contextvars.ContextVar("fxhalo_axis_view", default=None)


@contextlib.contextmanager
def axis_view(axis: int):
    """Within the block, every layout reads as its entry for mesh ``axis`` (:func:`sharding_of` too): a
    rule asked inside it decides along that axis alone."""
    token = _AXIS.set(axis)
    try:
        yield
    finally:
        _AXIS.reset(token)


class Items(tuple):
    """The layouts of a tuple-valued node's items, one :class:`Layout` (or ``None``) per item."""

    @property
    def is_sharded(self) -> bool:
        return any(item is not None and item.is_sharded for item in self)


def as_layout(view, n_axes: int = 1):
    """A rule's one-axis answer as a layout: ``Sharded`` (or ``Partial``) -> on the (one) axis, ``None`` ->
    replicated along each of the domain's ``n_axes`` mesh axes, a tuple -> :class:`Items`."""
    if isinstance(view, (Layout, Items)):
        return view
    if isinstance(view, tuple):
        return Items(as_layout(v, n_axes) for v in view)
    return Layout.replicated(n_axes) if view is None else Layout((view,))


def split(dim: int, length: int, domain, outer: int = 1) -> Sharded:
    """The entry of a global ``length`` split along ``dim`` by the partition rule, on this rank
    (the partition a :class:`~fxhalo.domain.Partitioned` length carries, else the balanced one)."""
    return Sharded(dim, domain.local_length(length), length, outer)


def resized(s: Sharded, m: int, domain) -> Sharded:
    """The layout of an op's output of ``m`` global rows along ``s.dim``: as long as the input, it keeps
    the input's partition (as the kernels do, :func:`fxhalo.geometry.split_rows`); else balanced."""
    return split(s.dim, s.global_length if int(m) == int(s.global_length) else m, domain)


def layout_of(arg) -> Layout | Items | None:
    """The layout recorded for an FX node (``None`` for non-nodes and nodes not yet propagated)."""
    meta = getattr(arg, "meta", None)
    return meta.get(LAYOUT) if meta is not None else None


def sharding_of(arg):
    """The one-axis view of :func:`layout_of`: the :class:`Sharded` (or :class:`Partial`) entry, ``None``
    for replicated values and non-nodes, a tuple of views for a tuple-valued node."""
    layout = layout_of(arg)
    if isinstance(layout, Items):
        return tuple(None if item is None else item.one_axis() for item in layout)
    return None if layout is None else layout.one_axis()


def split_axes(layout) -> list[tuple[int, Sharded]]:
    """``(mesh axis, entry)`` of every axis that splits a value laid out as ``layout`` (none for others)."""
    if not isinstance(layout, Layout):
        return []
    return [(axis, s) for axis, s in enumerate(layout.axes) if isinstance(s, Sharded)]


def global_shape_of(node) -> list[int]:
    """``node``'s example shape with every dim a mesh axis splits at its global length (all axes', whatever
    the axis view)."""
    layout = layout_of(node)
    shape = list(example_value(node).shape)
    for axis, s in split_axes(layout):
        shape[s.dim] = int(whole_entry(layout, axis).global_length)
    return shape


# -- one dim split by several axes -----------------------------------------------------------------
#
# A reshape can merge dims that different mesh axes split (H and W into the tokens of attention, or the
# window counts of a Swin partition into its window index).  The merged dim is then split by each of
# those axes, and each axis's entry describes it as that axis alone sees it, *with every other axis's
# dims at this rank's size*: the view the rules decide in (:func:`axis_view`).  For H (axis h) merged
# outside W (axis w) into ``[H*W]``, on the rank holding ``hl`` rows of H and ``wl`` of W:
#
#     h: Sharded(dim, hl*wl, H*wl)            one contiguous block of its own rows, whole W-blocks inside
#     w: Sharded(dim, hl*wl, hl*W, outer=hl)  one slice of each of the hl rows
#
# Every entry has the same ``local`` (this rank's true length), and the entry outside the others has
# the fewest blocks outside it: its ``outer`` is smaller.  Equal ``outer`` (one row per rank of the
# outer axis) cannot tell which axis is outside; :func:`nesting` returns ``None`` then, and the
# propagation gathers instead of keeping such a layout.


def shared_dims(layout) -> dict[int, tuple[int, ...]]:
    """Every tensor dim that several mesh axes split under ``layout``: dim -> those axes."""
    on_dim: dict[int, list[int]] = {}
    for axis, s in split_axes(layout):
        on_dim.setdefault(s.dim, []).append(axis)
    return {dim: tuple(axes) for dim, axes in on_dim.items() if len(axes) > 1}


def nesting(layout, dim: int) -> tuple[int, ...] | None:
    """The mesh axes that split ``dim``, outermost first; ``None`` when the entries do not describe one
    nested split (different local lengths, or two with the same ``outer``)."""
    axes = [axis for axis, s in split_axes(layout) if s.dim == dim]
    entries = [layout.axes[axis] for axis in axes]
    if len({s.local for s in entries}) != 1 or len({s.outer for s in entries}) != len(entries):
        return None
    return tuple(sorted(axes, key=lambda axis: layout.axes[axis].outer))


def whole_entry(layout, axis: int) -> Sharded:
    """Mesh ``axis``'s entry of ``layout`` for the value whole along every axis: ``Sharded(dim, N, N,
    outer)`` with ``N`` the dim's global length and ``outer`` the blocks outside this axis's factor, at
    the global lengths of the axes outside it.  What a reshape of the global shape needs to place it."""
    s = layout.axes[axis]
    order = nesting(layout, s.dim)
    if order is None or len(order) == 1:
        n = int(s.global_length)
        return Sharded(s.dim, n, n, s.outer)

    def scale(other: int) -> Fraction:  # the other axis's factor: global over local
        e = layout.axes[other]
        return Fraction(int(e.global_length), e.local)

    n = Fraction(s.local) * math.prod(scale(other) for other in order)
    outer = Fraction(s.outer) * math.prod(scale(other) for other in order[: order.index(axis)])
    if n.denominator != 1 or outer.denominator != 1:
        raise ValueError(f"entries of one dim that do not nest: {layout}")
    return Sharded(s.dim, int(n), int(n), int(outer))


def example_value(node):
    """The fake value Dynamo (or our meta refresh) recorded for ``node``, if any."""
    meta = node.meta
    val = meta.get("val", meta.get("example_value"))
    return val


def is_tensor_node(arg) -> bool:
    return hasattr(arg, "meta") and isinstance(example_value(arg), torch.Tensor)
