"""The analytic minimum of what a domain-parallel training step must send.

Worked out from the model alone, independently of fxhalo's own halo plans: the
model runs once on the ``meta`` device (shapes only, no compute) under a dispatch
mode that records every op that reads across the sharded dim, and each is costed
from first principles on an even partition of its input and output rows.

* **Convolution** (``aten.convolution``; a ``constant_pad_nd`` of the sharded dim
  feeding it counts as more padding, since pad rows are fills and cost nothing):
  rank ``r`` computes output rows ``[o0, o1)``; output row ``o`` reads input rows
  ``o*s - lo + j*d`` for ``j < k``.  Every such row inside ``[0, N)`` that rank ``r``
  does not own must be received: summed over ranks that is the forward's halo.  The
  backward returns each halo row's gradient to its owner, the same number of rows,
  unless the op's input needs no gradient (the first layer, fed by the data).
* **Linear / nearest interpolation** along the sharded dim (``upsample_*``): the
  source rows with a non-zero weight, from torch's source-index formula (clamped at
  the global edges), costed the same way.
* **GroupNorm** (``native_group_norm``): the forward needs 2 numbers per (sample,
  group) from every rank (sum and sum of squares), the backward 2 more (the sums of
  ``dy*w`` and ``dy*w*xhat``), in the activation dtype.

    minimum bytes per rank per step =
        (1/P) * sum over windowed ops of (1 + needs_grad) * (remote rows summed over ranks) * (bytes per row)
      + sum over group norms of (2 + 2 * needs_grad) * batch * groups * itemsize

(halo bytes are averaged over ranks, since edge ranks send less; each rank
contributes its statistics in full.)  The weight-gradient sum is not included: it
is the same for every domain-parallel method and is reported separately.  Ops that
this module does not know are assumed local, except two that need the whole sharded
dim: an FFT over it and attention (``F.scaled_dot_product_attention``, whose tokens come
from it in the benchmark models).  Their moves depend on the method's plan (which dim the
shard moves to, which modes it keeps), so they are listed in ``uncosted`` and not
costed: the report then shows no byte ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Minimum", "minimum_bytes", "even_partition", "remote_rows"]

aten = torch.ops.aten


@dataclasses.dataclass
class Minimum:
    """Minimum payload per rank per step, forward and backward together."""

    exchange: float = 0.0
    reduce: float = 0.0
    ops: list = dataclasses.field(default_factory=list)  # one line per costed op, for the JSON
    #: ops that need the whole sharded dim (an FFT over it, attention over its tokens): their moves are not
    #: costed here, so the minimum is a lower bound of the halos and statistics only
    uncosted: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> float:
        return self.exchange + self.reduce


def even_partition(n: int, p: int) -> list[tuple[int, int]]:
    if n % p:
        raise ValueError(f"{n} rows do not split evenly over {p} ranks")
    m = n // p
    return [(r * m, (r + 1) * m) for r in range(p)]


def remote_rows(n_in: int, n_out: int, p: int, reads) -> int:
    """Rows summed over ranks that a rank needs but does not own.

    ``reads(o)`` lists the input rows output row ``o`` needs (may include rows outside
    ``[0, n_in)``: padding, not counted).  Only output rows near the partition edges are
    asked about, so this is cheap for long sequences.
    """
    ins, outs = even_partition(n_in, p), even_partition(n_out, p)
    total = 0
    for (a, b), (o0, o1) in zip(ins, outs):
        need = set()
        # Reads move monotonically with o, so only the first outputs can read below a and
        # only the last ones above b: walk in from each end until the reads are all local.
        sides = ((range(o0, o1), lambda i, a=a: i < a), (range(o1 - 1, o0 - 1, -1), lambda i, b=b: i >= b))
        for order, outside in sides:
            for o in order:
                far = [i for i in reads(o) if outside(i)]
                if not far:
                    break
                need.update(i for i in far if 0 <= i < n_in)
        total += len(need)
    return total


class _Recorder(TorchDispatchMode):
    def __init__(self, dim: int, p: int):
        super().__init__()
        self.dim, self.p = dim, p
        self.padded: dict[int, tuple[torch.Tensor, int, int]] = {}  # id(out) -> (input, lo, hi)
        self.keep: list = []
        self.result = Minimum()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten.constant_pad_nd:
            x, pad = args[0], list(args[1])
            k = x.ndim - 1 - self.dim  # F.pad lists the last dim first
            lo, hi = (pad[2 * k], pad[2 * k + 1]) if 2 * k + 1 < len(pad) else (0, 0)
            if lo or hi:
                self.padded[id(out)] = (x, lo, hi)
                self.keep.append(out)  # keep ids unique while we use them
        elif packet is aten.convolution:
            self._conv(args, out)
        elif packet in (
            aten.upsample_bilinear2d,
            aten.upsample_linear1d,
            aten.upsample_trilinear3d,
            aten.upsample_nearest1d,
            aten.upsample_nearest2d,
            aten.upsample_nearest3d,
        ):
            self._resize(func, args, out)
        elif packet is aten.native_group_norm:
            x, n, groups = args[0], args[3], args[6]
            nbytes = (2 + 2 * x.requires_grad) * n * groups * x.element_size()
            self.result.reduce += nbytes
            self.result.ops.append(f"group_norm N={n} G={groups}: {nbytes} B of statistics")
        elif packet in (aten._fft_r2c, aten._fft_c2c, aten._fft_c2r) and self._along(args[0], args[1]):
            self.result.uncosted.append(f"{packet.__name__} over dims {list(args[1])}")
        return out

    def _along(self, x: torch.Tensor, dims) -> bool:
        """Does an op over ``dims`` of ``x`` run along the sharded dim?"""
        return self.dim in [d % x.ndim for d in dims]

    def _charge(self, what: str, x: torch.Tensor, rows: int) -> None:
        if not rows:
            return
        # The forward's rows, and their gradients back when the input needs one (not the data).
        passes = 1 + x.requires_grad
        row_bytes = x.numel() // x.shape[self.dim] * x.element_size()
        self.result.exchange += passes * rows * row_bytes / self.p
        self.result.ops.append(f"{what}: {rows} halo rows x {row_bytes} B x {passes} (fw{'+bw' * (passes - 1)}) / P")

    def _conv(self, args, out) -> None:
        x, w, _b, stride, padding, dilation, transposed = args[:7]
        if transposed:
            raise NotImplementedError("the minimum of a transposed conv is not worked out here")
        sdim = self.dim - 2
        k, s, d = w.shape[2 + sdim], stride[sdim], dilation[sdim]
        lo = hi = padding[sdim]
        if id(x) in self.padded:  # the pad's rows are fills: the conv reads the unpadded tensor
            x, plo, phi = self.padded[id(x)]
            lo, hi = lo + plo, hi + phi
        n_in, n_out = x.shape[self.dim], out.shape[self.dim]
        rows = remote_rows(n_in, n_out, self.p, lambda o: [o * s - lo + j * d for j in range(k)])
        self._charge(f"conv k={k} s={s} d={d} pad=({lo},{hi}) {n_in}->{n_out}", x, rows)

    def _resize(self, func, args, out) -> None:
        x = args[0]
        n_in, n_out = x.shape[self.dim], out.shape[self.dim]
        if n_in == n_out:
            return
        sdim = self.dim - 2
        nearest = "nearest" in func.overloadpacket.__name__
        # The vec overloads carry scale factors as a list; the plain ones as trailing floats.
        align = False if nearest else bool(args[2])
        scales = [a for a in args[2 + (not nearest) :] if a is None or isinstance(a, float)]
        if func._overloadname == "vec":
            factors = args[-1]
            scale_arg = factors[sdim] if factors else None
        else:
            scale_arg = scales[sdim] if sdim < len(scales) else None
        if align:
            scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            scale = 1.0 / scale_arg if scale_arg else n_in / n_out

        def reads(o):
            if nearest:
                return [min(int(math.floor(o * scale)), n_in - 1)]
            src = scale * o if align else max(scale * (o + 0.5) - 0.5, 0.0)
            i0 = int(math.floor(src))
            lam = src - i0
            i1 = i0 + 1 if i0 < n_in - 1 else i0
            return [i for i, wt in ((i0, 1 - lam), (i1, lam)) if wt != 0]

        rows = remote_rows(n_in, n_out, self.p, reads)
        self._charge(f"{func.overloadpacket.__name__} {n_in}->{n_out}", x, rows)


class _Attention(TorchFunctionMode):
    """Notes every ``F.scaled_dot_product_attention``: its tokens come from the sharded dim in the benchmark
    models.  (Seen as the call: under the dispatcher it is already matmuls and a softmax.)"""

    def __init__(self, result: Minimum):
        super().__init__()
        self.result = result

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.result.uncosted.append("scaled_dot_product_attention (attention over the sharded tokens)")
        return func(*args, **(kwargs or {}))


def minimum_bytes(model: torch.nn.Module, x: torch.Tensor, shard_dim: int, ranks: int) -> Minimum:
    """The analytic minimum for ``model`` on the global input ``x`` over ``ranks`` ranks."""
    meta_model = copy.deepcopy(model).to("meta")
    rec = _Recorder(shard_dim % x.ndim, ranks)
    # With autograd: an op's input says whether the backward needs its halo's gradient.
    with rec, _Attention(rec.result):
        meta_model(torch.empty(x.shape, dtype=x.dtype, device="meta"))
    return rec.result
