"""Moving the shard between tensor dims (fxhalo.redistribute) against slicing one global tensor.

One spawn of 4 gloo ranks runs every case on groups of 2, 3 and 4 ranks.  Each case
builds the global tensor on every rank, takes this rank's slab along ``src_dim``
(balanced, or an arbitrary partition), moves it, and compares:

- ``out``: the result is this rank's slab along ``dst_dim`` (a wrong piece order or
  split shows up here, usually on the ranks past the first);
- ``grad``: the backward is the reverse move (the gradient of the input slab is the
  upstream gradient's slab along ``src_dim``);
- ``one collective``: exactly one all_to_all_single, sending ``(P-1)/P`` of the slab.

Two memory properties ride along: several slabs moved in one collective (attention's q,
k and v) take back their gradients in one buffer (the backward has no zero-filled buffer
per slab), and a slice of global rows that a rank holds none of is a fresh empty tensor,
not a view that would keep the rank's whole slab alive for autograd.

The round trip of the seed's Hyena block rides on it: sequence-sharded ``[B, C, L]``
-> ``seq_to_channels`` -> ``DistributedDepthwiseConv1d(x, cp_group)`` over the whole
sequence -> ``channels_to_seq``, equal to one device, weight gradients included.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.harness import close, failed_by_world_size, spawned_once

WORLD_SIZES = (2, 3, 4)


class _Collectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and "wait" not in func.name():
            self.seen.append((func.name().split("::")[1].split(".")[0], args))
        return func(*args, **(kwargs or {}))


def _rows(partition, rank):
    start = sum(partition[:rank])
    return start, partition[rank]


def _move_case(shape, src, dst, src_part, dtype, group, rank, P):
    import fxhalo

    g = torch.Generator().manual_seed(sum(shape) + src + dst)
    x = torch.randn(shape, generator=g, dtype=dtype)
    up = torch.randn(shape, generator=g, dtype=dtype)
    a, n = _rows(src_part, rank)
    slab = x.narrow(src, a, n).clone().requires_grad_()
    with _Collectives() as spy:
        y = fxhalo.redistribute(slab, src, dst, group)
    c, e = fxhalo.Domain.from_group(group).bounds(shape[dst])
    want = x.narrow(dst, c, e - c)
    y.backward(up.narrow(dst, c, e - c))
    sizes = [args[2] for name, args in spy.seen if name == "all_to_all_single"]  # the send splits
    own = n * (e - c) * x.numel() // (shape[src] * shape[dst])  # the piece that stays on this rank
    real = 2 if dtype.is_complex else 1  # complex values travel as their real views
    sent = sum(sizes[0]) - sizes[0][rank] if len(sizes) == 1 else None
    return {
        "out": torch.equal(y, want),
        "grad": torch.equal(slab.grad, up.narrow(src, a, n)),
        "one collective": len(spy.seen) == 1 and sent == real * (slab.numel() - own),
    }


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.name().split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


def _several_slabs_case(group, rank, P):
    """q, k and v moved H -> heads together: each equals its own move, and the backward gathers the three
    gradients into one buffer (before: a zero-filled buffer of the whole received size per slab)."""
    from fxhalo.domain import _balanced_partition
    from fxhalo.redistribute import redistribute_slabs

    g = torch.Generator().manual_seed(11)
    shape = (2, 2 * P, 3 * P + 1, 4)  # [B, heads, tokens, head dim], tokens sharded
    xs = [torch.randn(shape, generator=g) for _ in range(3)]
    ups = [torch.randn(shape, generator=g) for _ in range(3)]
    src = tuple(b - a for a, b in _balanced_partition(shape[2], P))
    dst = tuple(b - a for a, b in _balanced_partition(shape[1], P))
    a, n = _rows(src, rank)
    c, m = _rows(dst, rank)
    slabs = [x.narrow(2, a, n).clone().requires_grad_() for x in xs]
    outs = redistribute_slabs(slabs, 2, 1, group.group_name, src, dst, rank)
    with _Ops() as spy:
        torch.autograd.backward(outs, [u.narrow(1, c, m) for u in ups])
    return {
        "outs": all(torch.equal(y, x.narrow(1, c, m)) for y, x in zip(outs, xs)),
        "grads": all(torch.equal(s.grad, u.narrow(2, a, n)) for s, u in zip(slabs, ups)),
        "one gradient buffer": "select_backward" not in spy.seen and "stack" in spy.seen,
    }


def _empty_slice_case(group, rank, P):
    """x[:, 0:1] of rows sharded along dim 1: only rank 0 holds the row; elsewhere the result owns no
    storage (before: an empty view of the whole slab)."""
    from fxhalo.domain import ShardAxis
    from fxhalo.ops.moves import slice_rows

    lengths = tuple(2 for _ in range(P))
    x = torch.arange(2.0 * 2 * P * 3).reshape(2, 2 * P, 3)
    slab = x.narrow(1, 2 * rank, 2)
    out = slice_rows(slab, (slice(None), slice(0, 1)), axes=(ShardAxis(1, group.group_name, lengths),))
    want = x[:, 0:1] if rank == 0 else x[:, 0:0]
    return {
        "rows": torch.equal(out, want),
        "no view of the slab": rank == 0 or out.untyped_storage().nbytes() == 0,
    }


def _hyena_round_trip(group, rank, P):
    """Sequence-sharded -> channels -> a long depthwise conv with cp_group -> sequence, against one device."""
    import fxhalo

    torch.manual_seed(7)
    C, L = 2 * P, 4 * P + 1  # an uneven sequence split
    conv = fxhalo.nn.DistributedDepthwiseConv1d(C, kernel_size=L // 2, causal=True, num_groups=2, device="cpu")
    x = torch.randn(2, C, L)
    up = torch.randn(2, C, L)
    ref_in = x.clone().requires_grad_()
    conv(ref_in).backward(up)
    ref_w = conv.weight.grad.clone()
    conv.zero_grad()

    dom = fxhalo.Domain.from_group(group)
    a, b = dom.bounds(L)
    slab = x[..., a:b].clone().requires_grad_()
    y = fxhalo.channels_to_seq(conv(fxhalo.seq_to_channels(slab, group), cp_group=group), group)
    y.backward(up[..., a:b])
    w = conv.weight.grad.clone()
    dist.all_reduce(w, group=group)  # each rank's weight gradient covers its channels
    return {
        "out": close(y, conv(x)[..., a:b].detach())[0],
        "grad_in": close(slab.grad, ref_in.grad[..., a:b])[0],
        "grad weight": close(w, ref_w)[0],
    }


def _cases(P):
    uneven = [3, 1, 4, 2][:P]
    return {
        "[B, C, L] seq -> channels, L and C uneven": ((2, 5, 4 * P + 1), 2, 1, None, torch.float32),
        "[B, C, H, W] H -> batch": ((P + 1, 3, 2 * P, 5), 2, 0, None, torch.float32),
        "[B, C, H, W] H -> W, complex": ((2, 3, 2 * P + 1, 6), 2, 3, None, torch.complex64),
        f"arbitrary source partition {uneven}": ((2, sum(uneven), 7), 1, 2, uneven, torch.float64),
    }


def _run(rank, world_size):
    out = {}
    for P in WORLD_SIZES:
        group = dist.new_group(list(range(P))) if P < world_size else dist.group.WORLD
        if rank < P:
            res = {}
            for name, (shape, src, dst, part, dtype) in _cases(P).items():
                part = part or [b - a for a, b in _balanced(shape[src], P)]
                res[name] = _move_case(shape, src, dst, part, dtype, group, rank, P)
            res["hyena round trip"] = _hyena_round_trip(group, rank, P)
            res["q, k, v in one move"] = _several_slabs_case(group, rank, P)
            res["a slice of rows held elsewhere"] = _empty_slice_case(group, rank, P)
            out[P] = res
        dist.barrier()
    return out


def _balanced(n, P):
    from fxhalo.domain import _balanced_partition

    return _balanced_partition(n, P)


@pytest.mark.timeout(330)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_moves_match_slicing_one_tensor_with_one_collective(P):
    failures = failed_by_world_size(spawned_once(_run, max(WORLD_SIZES), timeout=300), P)
    assert not failures, failures
