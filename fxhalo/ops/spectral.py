"""Fourier transforms along the sharded dim: the slab decomposition, one move of the shard.

A transform over dims ``D`` is a product of one-dimensional transforms, one per dim
of ``D``.  When the sharded dim ``d`` is in ``D``, the planner (:func:`plan_fft`)
writes the transform as a short program of :class:`Step`s that every rank runs alike:

1. the one-dimensional transforms of ``D`` other than ``d`` (each rank holds them whole);
2. one **move** of the shard from ``d`` to a *carrier* dim ``c``
   (:func:`fxhalo.redistribute.redistribute_slab`, one ``all_to_all_single``);
3. the transform along ``d``, now whole on every rank.

The output is sharded along ``c``.  The carrier is, best first, a dim of ``D``
transformed in step 1 (the slab FFT: a forward and an inverse transform of an FNO
layer cost one move each, and the spectral tensor stays sharded along a frequency
dim), else a dim the transform never touches (batch, channels).  Real transforms
keep torch's order: ``rfftn`` takes its last dim real-to-complex first (or, when the
last dim is the sharded one, as a complex transform cut to ``n // 2 + 1`` after the
move, the same numbers for a real input); ``irfftn`` takes its last dim
complex-to-real last, so the last dim can carry only when it is the sharded one.
Per-dim ``n`` (from ``s=``) and ``norm`` compose: each factor scales by its own
length, as torch's N-D transform does.  Complex values travel as real views.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..domain import ShardAxis, one_axis
from ..redistribute import redistribute_slab

__all__ = ["Step", "FftPlan", "plan_fft", "run_fft_plan", "fft"]

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


@dataclasses.dataclass(frozen=True)
class FftPlan:
    """The steps, the carrier dim and its global length (the output's sharded dim)."""

    steps: tuple[Step, ...]
    carrier: int
    carrier_length: int


def _one_d(kind: str, x: torch.Tensor, step: Step) -> torch.Tensor:
    if kind == "c2c_half":  # rfft of a real signal that the transforms before made complex
        n = step.n if step.n is not None else x.shape[step.dim]
        return torch.fft.fft(x, n=n, dim=step.dim, norm=step.norm).narrow(step.dim, 0, n // 2 + 1)
    return _ONE_D[kind](x, n=step.n, dim=step.dim, norm=step.norm)


def run_fft_plan(x: torch.Tensor, steps: tuple[Step, ...], group_name: str, src_lengths, rank: int) -> torch.Tensor:
    """Run a plan's steps on this rank's slab (``src_lengths``: every rank's rows of the sharded dim)."""
    for step in steps:
        if step.kind == "move":
            x = redistribute_slab(x, step.dim, step.dst, group_name, tuple(src_lengths), step.dst_lengths, rank)
        else:
            x = _one_d(step.kind, x, step)
    return x


def fft(input, steps: tuple[Step, ...], *, axes: tuple[ShardAxis, ...]):
    """The kernel the rewrite inserts for a transform over the sharded dim (steps from :func:`plan_fft`)."""
    from ..domain import Domain

    shard_dim, group_name, length = one_axis(axes)
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    return run_fft_plan(input, steps, group_name, domain.lengths(length), domain.rank)


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


def plan_fft(op: FftOp, shape: tuple[int, ...], shard_dim: int, size: int, balanced) -> FftPlan:
    """The steps of ``op`` on a global ``shape`` sharded along ``shard_dim`` over ``size`` ranks.

    ``balanced(length) -> lengths`` splits the carrier's length.  Raises :class:`NoCarrier`.
    """
    d = shard_dim
    order = list(range(len(op.dims)))
    i_d = op.dims.index(d)
    last = len(op.dims) - 1
    real_forward, real_inverse = op.kind in ("r2c", "ir2hc"), op.kind in ("c2r", "hc2r")
    after = list(shape)
    for i in order:
        after[op.dims[i]] = _length_after(op, i, shape[op.dims[i]])
    inverse = op.kind in ("ic2c", "c2r", "hc2r", "ir2hc")

    def step(i: int) -> Step:
        """The one-dimensional transform of ``op.dims[i]``: the op's own kind on its real (last) dim."""
        kind = op.kind if i == last and (real_forward or real_inverse) else "ic2c" if inverse else "c2c"
        return Step(kind, op.dims[i], op.ns[i], op.norm)

    # Carriers inside D: any transformed dim but d, except the last of a complex-to-real
    # transform unless d is that last dim (the c2r must see its whole dim last).
    inside = [i for i in order if i != i_d and not (real_inverse and i == last) and after[op.dims[i]] >= size]
    if inside:
        c = op.dims[max(inside, key=lambda i: (after[op.dims[i]], i))]
        move = Step("move", d, dst=c, dst_lengths=tuple(balanced(after[c])))
        first = [i for i in _torch_order(op) if i != i_d]  # a real-to-complex last dim first
        if real_forward and i_d == last:  # the real dim is the sharded one: complex after the move, cut
            tail = [Step("c2c_half", d, op.ns[i_d], op.norm)]
        elif real_inverse and i_d != last:  # the complex-to-real last dim stays last, after d's transform
            first, tail = first[:-1], [step(i_d), step(last)]
        else:
            tail = [step(i_d)]
        return FftPlan((*(step(i) for i in first), move, *tail), c, after[c])
    # Carriers outside D: leading dims first (a batch is never mixed), else the longest.
    outside = [c for c in range(len(shape)) if c not in op.dims and shape[c] >= size]
    if not outside:
        raise NoCarrier()
    c = min(outside) if outside[0] == 0 else max(outside, key=lambda c: (shape[c], -c))
    move = Step("move", d, dst=c, dst_lengths=tuple(balanced(shape[c])))
    return FftPlan((move, *(step(i) for i in _torch_order(op))), c, shape[c])


def _torch_order(op: FftOp) -> list[int]:
    """The order of one-dimensional transforms equal to torch's N-D one: a real-to-complex last dim
    first, a complex-to-real last dim last."""
    n = len(op.dims)
    if op.kind in ("r2c", "ir2hc"):
        return [n - 1, *range(n - 1)]
    return list(range(n))
