"""Fourier transforms along sharded dims: the slab decomposition on one axis, the pencil on several.

A transform over dims ``D`` is a product of one-dimensional transforms, one per dim
of ``D``, and those along different dims commute.  When a mesh axis splits a dim of
``D``, the planner (:func:`plan_fft`) writes the transform as a short program of
:class:`Step`s that every rank runs alike: the one-dimensional transforms of the dims
each rank holds whole, and **moves** of a shard from a dim still to transform onto a
*carrier* dim (:func:`fxhalo.redistribute.redistribute_slab`, one ``all_to_all_single``
over that axis's ranks), after which that dim is whole and its transform runs.

On one axis that is the slab decomposition:

1. the one-dimensional transforms of ``D`` other than the sharded ``d``;
2. one move of the shard from ``d`` to a carrier ``c``;
3. the transform along ``d``, now whole on every rank.

The output is sharded along ``c``.  The carrier is, best first, a dim of ``D``
transformed in step 1 (the slab FFT: a forward and an inverse transform of an FNO
layer cost one move each, and the spectral tensor stays sharded along a frequency
dim), else a dim the transform never touches (batch, channels).

On a mesh whose axes split two dims of ``D`` (H and W of an ``rfft2``), no dim of
``D`` is whole at first: one axis parks on a dim the transform never touches (the
batch, else the channels), the other moves onto the dim just transformed, and at the
end the parked axis moves onto a transformed dim (``settle``), so the spectrum is
split along frequency dims only, as on one axis: three moves for a 2-D transform on
a 2-D mesh, and a channel mix (an FNO's ``einsum``) stays local.

Real transforms keep torch's order: ``rfftn`` takes its last dim real-to-complex
first (or, when the last dim is split, as a complex transform cut to ``n // 2 + 1``
after the move, the same numbers for a real input); ``irfftn`` takes its last dim
complex-to-real last, so it never carries before its transform.  Per-dim ``n`` (from
``s=``) and ``norm`` compose: each factor scales by its own length, as torch's N-D
transform does.  Complex values travel as real views.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..domain import ShardAxis, balanced_lengths, several_axes
from ..redistribute import run_moves

__all__ = ["Step", "AxisShard", "FftPlan", "plan_fft", "run_fft_plan", "fft"]

#: one-dimensional transforms by kind
_ONE_D = {
    "c2c": torch.fft.fft,
    "ic2c": torch.fft.ifft,
    "r2c": torch.fft.rfft,
    "c2r": torch.fft.irfft,
    "hc2r": torch.fft.hfft,
    "ir2hc": torch.fft.ihfft,
}


class Step(NamedTuple):
    """A one-dimensional transform (``kind`` in :data:`_ONE_D`, or ``"c2c_half"``: a forward complex
    transform cut to ``n // 2 + 1``), or a ``"move"`` of the shard from ``dim`` to ``dst``.  (A named
    tuple: FX prints it in the graph's code as a call.)"""

    kind: str
    dim: int
    n: int | None = None
    norm: str | None = None
    dst: int | None = None
    dst_lengths: tuple[int, ...] | None = None
    #: a move's mesh axis (an index into the kernel's ``axes``) and its ranks' rows of ``dim`` before it
    axis: int = 0
    src_lengths: tuple[int, ...] | None = None


class AxisShard(NamedTuple):
    """Where one mesh axis splits a value, as the planner tracks it: the dim, and every rank's rows of it
    along the axis (in the axis's rank order)."""

    dim: int
    lengths: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FftPlan:
    """The steps; where each axis splits the output (in the order of the input's axes); the output's global
    shape."""

    steps: tuple[Step, ...]
    out: tuple[AxisShard, ...]
    shape: tuple[int, ...]


def _one_d(kind: str, x: torch.Tensor, step: Step) -> torch.Tensor:
    if kind == "c2c_half":  # rfft of a real signal that the transforms before made complex
        n = step.n if step.n is not None else x.shape[step.dim]
        return torch.fft.fft(x, n=n, dim=step.dim, norm=step.norm).narrow(step.dim, 0, n // 2 + 1)
    return _ONE_D[kind](x, n=step.n, dim=step.dim, norm=step.norm)


def run_fft_plan(x: torch.Tensor, steps: tuple[Step, ...], groups: tuple[str, ...]) -> torch.Tensor:
    """Run a plan's steps on this rank's block (``groups``: the process group of each of the plan's axes)."""
    for step in steps:
        x = run_moves(x, (step,), groups) if step.kind == "move" else _one_d(step.kind, x, step)
    return x


@several_axes
def fft(input, steps: tuple[Step, ...], *, axes: tuple[ShardAxis, ...]):
    """The kernel the rewrite inserts for a transform over a sharded dim (steps from :func:`plan_fft`;
    ``axes``: every axis that splits the input, in the plan's order; the steps carry every length)."""
    return run_fft_plan(input, steps, tuple(a.group_name for a in axes))


# -- planning ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FftOp:
    """A torch.fft call reduced to what the planner needs: per-dim kinds, sizes and the norm."""

    dims: tuple[int, ...]  # non-negative, in torch's order (the last is the real one of r/irfftn)
    ns: tuple[int | None, ...]  # the signal size per dim (``n``/``s``), None: the input's
    norm: str | None
    kind: str  # "c2c", "ic2c", "r2c", "c2r", "hc2r", "ir2hc"


class NoCarrier(Exception):
    """No dim can carry the shard (every dim transformed, or too short to give each rank a row)."""


def _length_after(op: FftOp, i: int, length: int) -> int:
    """The length along ``op.dims[i]`` after its transform, from ``length`` before it."""
    n = op.ns[i]
    last = i == len(op.dims) - 1
    if op.kind in ("r2c", "ir2hc") and last:
        return (n if n is not None else length) // 2 + 1
    if op.kind in ("c2r", "hc2r") and last:
        return n if n is not None else 2 * (length - 1)
    return n if n is not None else length


def plan_fft(op: FftOp, shape: tuple[int, ...], axes: tuple[AxisShard, ...], *, settle: bool = False) -> FftPlan:
    """The steps of ``op`` on a global ``shape`` split over ``axes`` (every mesh axis that splits the input,
    one dim each; one entry on a 1-D domain).  Raises :class:`NoCarrier`.

    Greedy, the same rule for one axis and several: transform every dim no axis splits
    (in torch's order, a complex-to-real last dim last); when only split dims are left,
    move one axis off its dim onto a carrier and go on.  A carrier is a dim no axis
    splits and that is not waiting for its transform: best a dim already transformed
    (the longest), else one the op never touches (a batch dim first, else the longest);
    it needs a row per rank of the axis.  So each axis moves at most once: the slab
    decomposition on one axis, the pencil on several.  With ``settle`` (several axes),
    an axis parked on a dim the op never touches moves once more, onto a transformed
    dim, where a later channel mix or elementwise op finds the layout it expects.
    """
    last = len(op.dims) - 1
    real_forward, real_inverse = op.kind in ("r2c", "ir2hc"), op.kind in ("c2r", "hc2r")
    inverse = op.kind in ("ic2c", "c2r", "hc2r", "ir2hc")
    length = list(shape)
    where = list(axes)
    pending = _torch_order(op)
    steps: list[Step] = []
    moved: set[int] = set()

    def kind_of(i: int) -> str:
        if i == last and real_forward and any(s.kind != "move" for s in steps):
            return "c2c_half"  # the others made it complex: a complex transform cut to n // 2 + 1
        if i == last and (real_forward or real_inverse):
            return op.kind
        return "ic2c" if inverse else "c2c"

    def split_dims() -> set[int]:
        return {a.dim for a in where}

    def carrier(size: int, dims) -> int | None:
        free = [c for c in dims if c not in split_dims() and length[c] >= size]
        if not free:
            return None
        if 0 in free and 0 not in op.dims:  # a batch dim is never mixed
            return 0
        return max(free, key=lambda c: (length[c], op.dims.index(c) if c in op.dims else -c))

    def move(axis: int, dst: int) -> None:
        src = where[axis]
        new = AxisShard(dst, balanced_lengths(length[dst], len(src.lengths)))
        steps.append(Step("move", src.dim, dst=dst, dst_lengths=new.lengths, axis=axis, src_lengths=src.lengths))
        where[axis] = new
        moved.add(axis)

    while True:
        for i in list(pending):
            if op.dims[i] in split_dims() or (real_inverse and i == last and len(pending) > 1):
                continue
            steps.append(Step(kind_of(i), op.dims[i], op.ns[i], op.norm))
            length[op.dims[i]] = _length_after(op, i, length[op.dims[i]])
            pending.remove(i)
        if not pending:
            break
        waiting = {op.dims[i] for i in pending}
        done = [d for d in op.dims if d not in waiting]
        outside = [c for c in range(len(shape)) if c not in op.dims]
        # the axis off a dim whose transform can run next (a complex-to-real last dim waits for the others)
        stuck = [a for a, s in enumerate(where) if s.dim in waiting]
        stuck.sort(key=lambda a: real_inverse and where[a].dim == op.dims[last] and len(pending) > 1)
        axis = stuck[0]
        size = len(where[axis].lengths)
        dst = carrier(size, done)
        dst = dst if dst is not None else carrier(size, outside)
        if dst is None:
            raise NoCarrier()
        move(axis, dst)
    if settle:
        for axis in sorted(moved):
            if where[axis].dim not in op.dims:
                dst = carrier(len(where[axis].lengths), op.dims)
                if dst is not None:
                    move(axis, dst)
    return FftPlan(tuple(steps), tuple(where), tuple(length))


def _torch_order(op: FftOp) -> list[int]:
    """The order of one-dimensional transforms equal to torch's N-D one: a real-to-complex last dim
    first, a complex-to-real last dim last."""
    n = len(op.dims)
    if op.kind in ("r2c", "ir2hc"):
        return [n - 1, *range(n - 1)]
    return list(range(n))
