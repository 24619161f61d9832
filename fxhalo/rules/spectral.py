"""Fourier transforms (``torch.fft``) and the complex ops around them.

A transform whose dims leave out the sharded dim is local.  One over the sharded dim
becomes :func:`fxhalo.ops.spectral.fft`: the slab decomposition, one move of the shard
onto a carrier dim (see that module), and its output is sharded along the carrier.
When no dim can carry the shard (every dim transformed, or the others too short to
give each rank a row) the op is refused with a remedy.

Complex helpers are elementwise and local: ``torch.real``/``imag``/``conj``/``angle``/
``complex``/``polar`` and the ``.real``/``.imag`` attributes;
``torch.view_as_real`` adds a last dim of 2 and ``torch.view_as_complex`` removes it,
so both keep the sharded dim (``view_as_complex`` refuses a shard on that last dim).
"""

from __future__ import annotations

import builtins
import inspect

import torch

from ..layout import Sharded, example_value, global_shape_of, layout_of, sharding_of, split, split_axes
from ..ops import shift as shift_ops
from ..ops import spectral as ops
from . import Decision, KernelCall, LayoutRule, Rule, bind, decided_on_mesh, register, register_op
from . import shift as shift_rules
from .local import ELEMENTWISE
from .resample import domain_for, require_contiguous


def _one_d_signature(input, n=None, dim=-1, norm=None): ...


def _two_d_signature(input, s=None, dim=(-2, -1), norm=None): ...


def _n_d_signature(input, s=None, dim=None, norm=None): ...


_SIGS = {1: inspect.signature(_one_d_signature), 2: inspect.signature(_two_d_signature)}
_N_D = inspect.signature(_n_d_signature)

#: torch.fft name -> (kind of transform, dims it takes: 1, 2 or None for n-D)
_OPS = {
    "fft": ("c2c", 1),
    "ifft": ("ic2c", 1),
    "rfft": ("r2c", 1),
    "irfft": ("c2r", 1),
    "hfft": ("hc2r", 1),
    "ihfft": ("ir2hc", 1),
    "fft2": ("c2c", 2),
    "ifft2": ("ic2c", 2),
    "rfft2": ("r2c", 2),
    "irfft2": ("c2r", 2),
    "fftn": ("c2c", None),
    "ifftn": ("ic2c", None),
    "rfftn": ("r2c", None),
    "irfftn": ("c2r", None),
}


def _as_tuple(v):
    return None if v is None else tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else [v]))


class FftRule(Rule):
    name = "fft"

    def __init__(self, fn_name: str):
        self.kind, self.ndims = _OPS[fn_name]
        self.sig = _SIGS.get(self.ndims, _N_D)

    def fft_op(self, node, ndim: int) -> ops.FftOp:
        a = bind(self.sig, node)
        if self.ndims == 1:
            dims, ns = (int(a["dim"]) % ndim,), (None if a["n"] is None else int(a["n"]),)
        else:
            s, dim = _as_tuple(a["s"]), _as_tuple(a["dim"])
            if dim is None:
                dim = tuple(range(ndim - len(s), ndim)) if s is not None else tuple(range(ndim))
            dims = tuple(d % ndim for d in dim)
            ns = s if s is not None else (None,) * len(dims)
        return ops.FftOp(dims, ns, a["norm"], self.kind)

    def decide(self, node, ctx) -> Decision:
        x = bind(self.sig, node)["input"]
        s = sharding_of(x)
        if s is None:
            return Decision()
        op = self.fft_op(node, example_value(x).ndim)
        if s.dim not in op.dims:
            return Decision(s)  # the transform leaves the sharded dim alone
        plan = self._plan(node, ctx, x, op, [(ctx.domain, s)])
        (out,) = plan.out
        return Decision(split(out.dim, plan.shape[out.dim], ctx.domain), self._call(plan), s, plan)

    def decide_on_mesh(self, node, ctx) -> Decision:
        """On a mesh of several axes, one plan over every axis that splits the input (the pencil when two
        of them split transformed dims); the kernel gets every such axis, in mesh order."""
        x = bind(self.sig, node)["input"]
        layout = layout_of(x)
        axes = split_axes(layout)
        op = self.fft_op(node, example_value(x).ndim)
        if not any(s.dim in op.dims for _, s in axes):
            return Decision(layout)  # the transform leaves every sharded dim alone
        plan = self._plan(node, ctx, x, op, [(ctx.mesh.axes[axis], s) for axis, s in axes], settle=True)
        moved = {step.axis for step in plan.steps if step.kind == "move"}
        targets = [(w.dim, plan.shape[w.dim]) if k in moved else None for k, w in enumerate(plan.out)]
        return decided_on_mesh(ctx, layout, axes, targets, self._call(plan), plan)

    def _plan(self, node, ctx, x, op: ops.FftOp, axes, settle: bool = False) -> ops.FftPlan:
        """The plan over ``axes`` (``(Domain, Sharded)`` of every axis that splits ``x``), or refused."""
        shape = global_shape_of(x)
        for _, s in axes:
            if s.dim in op.dims:
                require_contiguous(node, ctx, s)
        split_as = tuple(ops.AxisShard(s.dim, domain.lengths(s.global_length)) for domain, s in axes)
        try:
            return ops.plan_fft(op, tuple(shape), split_as, settle=settle)
        except ops.NoCarrier:
            dims = [s.dim for _, s in axes if s.dim in op.dims]
            ctx.refuse(
                node,
                f"transforms the sharded dims {dims} over dims {list(op.dims)} of a tensor of global shape "
                f"{tuple(shape)}, and no other dim can carry the shard (each rank needs a row of it)",
                "transform over fewer dims, keep a batch or channel dim of at least one row per rank, or "
                "run the transform on fxhalo.gather()ed values",
            )

    def _call(self, plan: ops.FftPlan):
        def call(node) -> KernelCall:
            return KernelCall(ops.fft, (bind(self.sig, node)["input"], plan.steps))

        return call


for _name in _OPS:
    register(FftRule(_name), getattr(torch.fft, _name))


class FftShiftRule(Rule):
    """``torch.fft.fftshift`` / ``ifftshift``: a roll by half of each shifted dim (``n // 2``, or back by
    ``-(n // 2)``); over the sharded dim it is :func:`fxhalo.ops.shift.roll` (a ring shift of exactly
    the rolled rows), elsewhere local."""

    name = "fft"

    def __init__(self, inverse: bool):
        self.inverse = inverse

    def decide(self, node, ctx) -> Decision:
        x = node.args[0] if node.args else node.kwargs["input"]
        s = sharding_of(x)
        if s is None:
            return Decision()
        local = example_value(x)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(range(local.ndim)) if dim is None else tuple(d % local.ndim for d in _as_tuple(dim))
        if s.dim not in dims:
            return Decision(s)
        require_contiguous(node, ctx, s)
        # every sharded dim at its global size (on a mesh, the other axes' too: each axis makes the same call)
        shape = global_shape_of(x)
        sizes = [shape[d] for d in dims]
        shifts = tuple(-(n // 2) if self.inverse else n // 2 for n in sizes)
        shift_rules._planned(
            node,
            ctx,
            lambda: shift_ops.roll_plan(
                domain_for(ctx, s), s.global_length, shifts[dims.index(s.dim)], "torch.fft.fftshift"
            ),
        )
        return Decision(s, lambda node: KernelCall(shift_ops.roll, (node.args[0], shifts, dims)), s)


register(FftShiftRule(False), torch.fft.fftshift)
register(FftShiftRule(True), torch.fft.ifftshift)


class ViewAsReal(LayoutRule):
    """``view_as_real`` (a last dim of 2 appended) and ``view_as_complex`` (that dim removed)."""

    name = "local"

    def __init__(self, to_real: bool):
        self.to_real = to_real

    def layout(self, node, ctx):
        x = node.args[0] if node.args else node.kwargs["input"]
        s = sharding_of(x)
        if s is None:
            return None
        if not self.to_real and s.dim == example_value(x).ndim - 1:
            ctx.refuse(node, "makes complex numbers of pairs split between ranks", "shard another dim")
        return s


class ComplexPart(LayoutRule):
    """``x.real`` / ``x.imag`` (a ``getattr`` node): elementwise views; other tensor attributes refused."""

    name = "local"

    def layout(self, node, ctx):
        x, attr = node.args[0], node.args[1]
        s = sharding_of(x)
        if s is None:
            return None
        if attr not in ("real", "imag"):
            ctx.refuse(node, f"reads the attribute {attr!r} of a sharded tensor", "read it outside the compiled region")
        return s if isinstance(s, Sharded) else None


register_op(ELEMENTWISE, "real", "imag", "conj", "conj_physical", "resolve_conj", "resolve_neg", "angle")
register_op(ELEMENTWISE, "complex", "polar")
register_op(ViewAsReal(True), "view_as_real")
register_op(ViewAsReal(False), "view_as_complex")
register(ComplexPart(), builtins.getattr)
