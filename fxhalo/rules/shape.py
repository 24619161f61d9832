"""Shape and indexing ops: follow the sharded dim where it survives, refuse where it does not.

* **Reshapes** (``view``, ``reshape``, ``flatten``, ``unflatten``) keep the row-major
  order of entries.  The rule lays the input's dims out as factors (the sharded
  dim contributes ``outer x S``) and deals them to the output dims in
  order.  Splitting the sharded factor keeps the shard on the outer part
  (``H -> (h, ws)`` shards ``h``, global ``P*h``); merging it with the dims inside it
  keeps a contiguous shard; merging it under an outer dim interleaves it
  (``outer > 1``).
  A split the sizes do not allow is refused.
* **Permutations** (``permute``, ``transpose``, ``movedim``, ``swapaxes``) move the dim.
* ``unsqueeze`` / ``squeeze`` / ``expand`` shift it, and refuse to squeeze or
  expand the sharded dim itself.
* ``split`` / ``chunk`` / ``unbind`` / ``cat`` / ``stack`` / indexing are local when
  they work along other dims; along the sharded dim they are not local and are
  refused (or, with ``fallback="gather"``, run on the gathered tensor).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator

import torch

from ..layout import GLOBAL_VALUE, Layout, Sharded, example_value, layout_of, sharding_of, split_axes, whole_entry
from ..ops import moves
from . import Decision, KernelCall, LayoutRule, Rule, bind, register, register_op


def _input(node):
    src = node.args[0] if node.args else next(iter(node.kwargs.values()))
    return src, sharding_of(src)


def _check_traced_size(node, ctx, src, s: Sharded) -> list[int]:
    """The input's local shape; refuse if Dynamo traced a different size along the sharded dim.

    Dynamo traced on local slabs; an earlier rewrite (a 'valid' conv, say) can give
    the sharded dim a different local size than Dynamo saw, and a reshape whose
    sizes Dynamo baked in would then be wrong.
    """
    shape = list(example_value(src).shape)
    if shape[s.dim] != s.local:
        ctx.refuse(
            node,
            f"reshapes a tensor whose local size along the sharded dim is {s.local}, while "
            f"the traced graph assumed {shape[s.dim]} (an earlier op changed the size)",
            "use padding that keeps sizes ('same') before reshapes, or compute the sizes from x.shape",
        )
    return shape


def reshape_sharding(in_shape, out_shape, s: Sharded, out_global=None) -> Sharded | str:
    """The sharding of a row-major reshape from ``in_shape`` to ``out_shape`` (local shapes), or why there
    is none.  ``out_global``: the output's global shape, when known (the global view); it tells an output
    dim of local size 1 that holds the shard's outer part (a window index, one window per rank) from a
    plain dim of size 1, which local sizes alone cannot."""
    factors = []  # [kind, local, global] in row-major order; kind "S" is the sharded factor
    for k, size in enumerate(in_shape):
        if k == s.dim:
            local, length = s.block
            factors += [["R", s.outer, s.outer], ["S", local, length]]
        else:
            factors.append(["R", size, size])
    factors = [f for f in factors if f[0] == "S" or f[1] != 1]

    result = None
    for k, size in enumerate(out_shape):
        need, taken = size, []
        # Does the S factor join this output dim although its local size is filled?  With the global shape
        # known, exactly when the dim's global size differs; without, when the S factor has local size 1
        # (it still stands for P global rows, and joins the dim being filled rather than vanishing).
        sharded_dim = out_global is not None and out_global[k] != size
        while factors and (
            need > 1 or (factors[0][0] == "S" and (sharded_dim if out_global is not None else factors[0][1] == 1))
        ):
            kind, local, glob = factors[0]
            if need % local == 0:
                taken.append(factors.pop(0))
                need //= local
            elif local % need == 0:
                rest = local // need
                if kind == "S":
                    taken.append(["S", need, glob // rest])  # the outer part keeps the shard
                else:
                    taken.append(["R", need, need])
                factors[0] = ["R", rest, rest]
                need = 1
            else:
                return (
                    f"the sizes do not allow it: output dim {k} (size {size}) would cut a dim of size {local} unevenly"
                )
        if need != 1:
            return f"output dim {k} (size {size}) is not made of whole input dims"
        if any(f[0] == "S" for f in taken):
            # Dims after the sharded factor stay inside each rank's block, so they join it;
            # dims before it interleave the blocks.
            i = next(j for j, f in enumerate(taken) if f[0] == "S")
            outer = math.prod(f[1] for f in taken[:i])
            inner = math.prod(f[1] for f in taken[i + 1 :])
            _, local, glob = taken[i]
            result = Sharded(k, outer * local * inner, outer * glob * inner, outer)
    if factors or result is None:
        return "the reshape does not keep every input entry"
    return result


def _scaled_partition(s: Sharded, out: Sharded, ctx) -> Sharded | None:
    """``out`` with every rank's length scaled from ``s``'s partition, when the global view can carry it.

    Each rank keeps its own entries through a reshape; only the partition of the new
    dim changes (``H`` of ``[10, 3, 12, 9]`` merged with ``W = 8`` is ``[80, 24, 96, 72]``).
    The plain path needs balanced shards and refuses instead (its caller).
    """
    if not ctx.global_view:
        return None
    old = ctx.domain.lengths(s.global_length)
    n, m = int(s.global_length), int(out.global_length)
    if any(q * m % n for q in old):
        return None
    new = tuple(q * m // n for q in old)
    if new[ctx.domain.rank] != out.local:
        return None
    return dataclasses.replace(out, global_length=ctx.domain.length_of(new))


class Reshape(LayoutRule):
    name = "reshape"

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        in_shape = _check_traced_size(node, ctx, src, s)
        glob = node.meta.get(GLOBAL_VALUE) if ctx.global_view else None
        out_global = _global_along_this_axis(src, s, list(glob.shape)) if isinstance(glob, torch.Tensor) else None
        out = reshape_sharding(in_shape, list(example_value(node).shape), s, out_global)
        if isinstance(out, str):
            ctx.refuse(
                node,
                f"reshapes the sharded dim {s.dim} ({s}) from {tuple(in_shape)} to "
                f"{tuple(example_value(node).shape)}, but {out}",
                "reshape so that the sharded dim is split into (outer, inner) parts or merged with "
                "dims inside it, e.g. make the local size a multiple of the window",
            )
        before, after = s.block[1], out.block[1]
        if s.lengths is None and (before == after or ctx.domain.rescales(before, after)):
            return out
        scaled = _scaled_partition(s, out, ctx)
        if scaled is not None:
            return scaled
        ctx.refuse(
            node,
            f"reshapes the sharded dim {s.dim} ({s}) so that its {before} global rows become "
            f"{after}, which moves rows between ranks: the shards "
            f"{ctx.domain.partition(s.global_length)} do not scale to the partition of {after}",
            "use even shards for this model (a global size divisible by the rank count), pass DomainTensors "
            "(the global view keeps each rank's rows through the reshape), or reshape only dims other than "
            "the sharded one",
        )


def _global_along_this_axis(src, s: Sharded, out_global: list[int]) -> list[int] | None:
    """The output's shape global along the axis of ``s`` only: on a mesh, each other axis's dim at this
    rank's share (the reshape rule tells the dim this axis splits by its size differing from the global
    one, and another axis's dims differ too).  ``None`` when another axis's dim does not map."""
    layout, g_in = layout_of(src), src.meta.get(GLOBAL_VALUE)
    if not isinstance(layout, Layout) or not isinstance(g_in, torch.Tensor):
        return out_global
    out = list(out_global)
    for axis, e in split_axes(layout):
        if e is s:
            continue
        n = int(e.global_length)
        whole = reshape_sharding(list(g_in.shape), list(out_global), whole_entry(layout, axis))
        if isinstance(whole, str) or (out[whole.dim] * e.local) % n:
            return None
        out[whole.dim] = out[whole.dim] * e.local // n
    return out


def _dim_map(node) -> list[int]:
    """Where each input dim goes, found by running the op on a meta tensor with distinct sizes."""
    src = example_value(node.args[0])
    primes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37][: src.ndim]
    probe = torch.empty(primes, device="meta")
    args = [probe] + list(node.args[1:])
    if node.op == "call_method":
        out = getattr(probe, node.target)(*args[1:], **node.kwargs)
    else:
        out = node.target(*args, **node.kwargs)
    return [list(out.shape).index(p) for p in primes]


class Permute(LayoutRule):
    name = "permute"

    def layout(self, node, ctx):
        _, s = _input(node)
        return None if s is None else s.moved(_dim_map(node)[s.dim])


class Unsqueeze(LayoutRule):
    name = "unsqueeze"

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        dim = bind(_DIM_SIG, node)["dim"]
        out_ndim = example_value(node).ndim
        dim = dim + out_ndim if dim < 0 else dim
        return s.moved(s.dim + 1 if dim <= s.dim else s.dim)


class Squeeze(LayoutRule):
    name = "squeeze"

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        in_shape = list(example_value(src).shape)
        out_shape = list(example_value(node).shape)
        dims = node.args[1:] or tuple(node.kwargs.values())
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        ndim = len(in_shape)
        if dims:
            squeezed = {d + ndim if d < 0 else d for d in dims}
        else:
            squeezed = {d for d, n in enumerate(in_shape) if n == 1}
        squeezed = {d for d in squeezed if in_shape[d] == 1}
        if s.dim in squeezed:
            ctx.refuse(
                node,
                f"squeezes the sharded dim {s.dim}, which holds 1 row here but {s.global_length} globally",
                "do not squeeze the sharded dim, or give each rank more than one row",
            )
        out = s.moved(s.dim - sum(1 for d in squeezed if d < s.dim))
        assert len(out_shape) == ndim - len(squeezed)
        return out


class Expand(LayoutRule):
    name = "expand"

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        out = example_value(node)
        dim = s.dim + out.ndim - example_value(src).ndim
        if out.shape[dim] != s.local:
            ctx.refuse(
                node,
                f"expands the sharded dim {s.dim} from {s.local} to {out.shape[dim]}",
                "expand only dims that are not sharded",
            )
        return s.moved(dim)


def _split_sig(tensor, split_size_or_sections=None, dim=0): ...
def _dim_sig(input, dim=0, *args, **kwargs): ...
def _cat_sig(tensors, dim=0, *, out=None): ...


_SPLIT_SIG = inspect.signature(_split_sig)
_DIM_SIG = inspect.signature(_dim_sig)
_CAT_SIG = inspect.signature(_cat_sig)


def _norm_dim(dim, ndim):
    return dim + ndim if dim < 0 else dim


class Split(LayoutRule):
    """``split``/``chunk``/``unbind``: a tuple of pieces, each sharded like the input."""

    name = "split"

    def __init__(self, removes_dim: bool = False):
        self.removes_dim = removes_dim

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        ndim = example_value(src).ndim
        dim = _norm_dim(bind(_DIM_SIG if self.removes_dim else _SPLIT_SIG, node)["dim"], ndim)
        if dim == s.dim:
            ctx.refuse(
                node,
                f"splits along the sharded dim {s.dim}, which is not local",
                "split along another dim, or use options={'fallback': 'gather'}",
            )
        piece = s.moved(s.dim - 1 if self.removes_dim and dim < s.dim else s.dim)
        return tuple(piece for _ in example_value(node))


class Cat(LayoutRule):
    """``cat``/``stack`` of identically sharded tensors along another dim."""

    name = "cat"

    def __init__(self, stacks: bool = False):
        self.stacks = stacks

    def layout(self, node, ctx):
        args = bind(_CAT_SIG, node)
        tensors = list(args["tensors"])
        shardings = [sharding_of(t) for t in tensors]
        if all(x is None for x in shardings):
            return None
        first = next(x for x in shardings if x is not None)
        if any(x is None or x.dim != first.dim or not x.same_layout(first) for x in shardings):
            ctx.refuse(
                node,
                "joins tensors that are not all sharded alike: "
                + ", ".join(f"{getattr(t, 'name', t)} {x or 'replicated'}" for t, x in zip(tensors, shardings)),
                "shard every operand the same way (a replicated operand would repeat the same rows on every rank)",
            )
        ndim = example_value(tensors[0]).ndim
        dim = _norm_dim(args["dim"], ndim + (1 if self.stacks else 0))
        if self.stacks:
            return first.moved(first.dim + 1 if dim <= first.dim else first.dim)
        if dim == first.dim:
            ctx.refuse(
                node,
                f"concatenates along the sharded dim {first.dim}, which is not local",
                "concatenate along another dim (e.g. channels), or use options={'fallback': 'gather'}",
            )
        return first


class GetItem(Rule):
    """``x[idx]`` on a sharded tensor, or picking an element of a tuple of sharded values.

    In the global view a slice of the sharded dim (``x[:, :, 2:-2]``, ``x[:, ::2]``) is local
    too: each rank keeps the selected rows it holds, and the output takes the partition
    of those counts (:func:`fxhalo.ops.moves.slice_rows`, no communication).
    """

    name = "getitem"

    def decide(self, node, ctx) -> Decision:
        src, idx = node.args
        s = sharding_of(src)
        if isinstance(s, tuple):  # an element of split/chunk/... output
            return Decision(s[idx])
        if s is None:
            return Decision()
        items = moves.expand_index(idx, example_value(src).ndim)
        in_dim = out_dim = 0
        result, kernel = None, False
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if in_dim == s.dim:
                if item != slice(None, None, None):
                    result, kernel = self._sliced(node, ctx, s, item, out_dim), True
                else:
                    result = s.moved(out_dim)
            if isinstance(item, slice):
                out_dim += 1
            elif not isinstance(item, int):
                ctx.refuse(
                    node,
                    f"indexes a sharded tensor with {type(item).__name__} {item!r}",
                    "use basic indexing (ints and slices) on dims that are not sharded",
                )
            in_dim += 1
        if result is None:  # the sharded dim lies past the explicit index items
            result = s.moved(out_dim + (s.dim - in_dim))
        if kernel:
            return Decision(result, _slice_rows_call, s)
        return Decision(result)

    @staticmethod
    def _sliced(node, ctx, s: Sharded, item, out_dim: int) -> Sharded:
        """The layout of a slice along the sharded dim, or a refusal."""
        plain = isinstance(item, slice) and all(v is None or isinstance(v, int) for v in (item.start, item.stop))
        if not ctx.global_view or not plain or not s.contiguous or (item.step or 1) <= 0 or isinstance(item.step, bool):
            ctx.refuse(
                node,
                f"indexes the sharded dim {s.dim} with {item!r}; each rank holds different rows, so this is "
                "not local" + ("" if ctx.global_view else " on local slabs"),
                "pass DomainTensors (the global view keeps a slice's rows where they are), index other dims "
                "only, or use options={'fallback': 'gather'}",
            )
        counts = tuple(c for c, _ in moves.rows_of_slice(item, ctx.domain.partition(s.global_length)))
        return Sharded(out_dim, counts[ctx.domain.rank], ctx.domain.length_of(counts))


def _slice_rows_call(node) -> KernelCall:
    return KernelCall(moves.slice_rows, tuple(node.args))


class Narrow(LayoutRule):
    """``narrow``/``select`` along other dims are local; along the sharded dim they are not."""

    name = "narrow"

    def __init__(self, removes_dim: bool):
        self.removes_dim = removes_dim

    def layout(self, node, ctx):
        src, s = _input(node)
        if s is None:
            return None
        dim = _norm_dim(bind(_DIM_SIG, node)["dim"], example_value(src).ndim)
        if dim == s.dim:
            ctx.refuse(
                node,
                f"takes rows of the sharded dim {s.dim}, which live on different ranks",
                "select along another dim, or use options={'fallback': 'gather'}",
            )
        return s.moved(s.dim - 1 if self.removes_dim and dim < s.dim else s.dim)


def assigned_dim(index, target_ndim: int, value_ndim: int, dim: int):
    """For ``target[index] = value``: ``(the index item at target dim dim, the value's dim that lands on
    it or None)``, or ``None`` when the index is not basic (ints, slices, ``None``, ``...``).  The value
    broadcasts against ``target[index]`` from the right."""
    items = moves.expand_index(index, target_ndim)
    if not all(i is None or isinstance(i, (int, slice)) for i in items):
        return None
    in_dim = out_dim = 0
    found = None
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == dim:
            found = (item, out_dim if isinstance(item, slice) else None)
        out_dim += isinstance(item, slice)
        in_dim += 1
    if found is None:  # dim lies past the explicit items
        found = (slice(None), out_dim + dim - in_dim)
    item, at = found
    if at is None:
        return item, None
    vdim = at - (out_dim + target_ndim - in_dim) + value_ndim
    return item, vdim if vdim >= 0 else None


class SetItem(Rule):
    """``target[index] = value`` (in place) with a sharded target.

    A target sharded along a dim the index leaves whole takes a value sharded alike there
    (or with size 1): local.  In the global view, a slice of the sharded dim is written by
    :func:`fxhalo.ops.moves.set_rows` (each rank writes the selected rows it holds; the value
    must hold them: the localize pass moves its rows when not).  A replicated target that
    gets sharded values is sharded first by the localize pass (the spectral buffer of an
    FNO layer, ``out_ft[:, :, :m1, :m2] = ...``)."""

    name = "setitem"

    def decide(self, node, ctx) -> Decision:
        target, index, value = node.args
        st, sv = sharding_of(target), sharding_of(value)
        if st is None and sv is None:
            return Decision()
        if not isinstance(st, Sharded) or not st.contiguous:
            ctx.refuse(
                node,
                f"writes values laid out as {sv} into a tensor laid out as {st or 'replicated'}",
                "pass DomainTensors (the global view shards the target), or build the tensor from sharded ops",
            )
        v = example_value(value) if hasattr(value, "meta") else None
        found = assigned_dim(index, example_value(target).ndim, getattr(v, "ndim", 0), st.dim)
        if found is None or found[0] is None or isinstance(found[0], int):
            ctx.refuse(
                node,
                f"indexes the sharded dim {st.dim} with {index!r}",
                "index the sharded dim with a slice, or gather the tensor first",
            )
        item, vdim = found
        whole = item == slice(None, None, None)
        if whole:
            lengths = ctx.domain.lengths(st.global_length)
        else:
            GetItem._sliced(node, ctx, st, item, st.dim)  # the same checks (and refusals) as a read
            lengths = tuple(c for c, _ in moves.rows_of_slice(item, ctx.domain.partition(st.global_length)))
        if isinstance(sv, Sharded) and vdim is not None and sv.dim == vdim:
            if ctx.domain.lengths(sv.global_length) != tuple(lengths):
                ctx.refuse(
                    node,
                    f"writes a value laid out as {sv} into rows split as {list(lengths)}",
                    "shard the value like the rows it is written to",
                )
        elif sv is not None:
            ctx.refuse(node, f"writes a value sharded as {sv} across the unsharded dims", "shard it alike")
        elif vdim is not None and v is not None and v.shape[vdim] != 1:
            ctx.refuse(
                node,
                f"writes a value laid out as {sv or 'replicated'} into rows split as {list(lengths)}",
                "shard the value like the rows it is written to",
            )
        if whole:
            return Decision()
        return Decision(None, lambda node: KernelCall(moves.set_rows, tuple(node.args)), st)


register_op(Reshape(), "reshape", "flatten", "unflatten", "view")
register_op(Permute(), "permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims")
register_op(Unsqueeze(), "unsqueeze")
register_op(Squeeze(), "squeeze")
register_op(Expand(), "expand", "expand_as")
register_op(Split(), "split", "chunk", "tensor_split")
register_op(Split(removes_dim=True), "unbind")
register_op(Cat(), "cat", "concat", "concatenate")
register_op(Cat(stacks=True), "stack")
register(GetItem(), operator.getitem)
register(SetItem(), operator.setitem)
register_op(Narrow(removes_dim=False), "narrow")
register_op(Narrow(removes_dim=True), "select")
