"""Move the shard of a tensor from one tensor dim to another: one ``all_to_all_single``.

A slab sharded along ``src_dim`` (every rank holds a block of rows of it, any
partition) becomes a slab of the same global tensor sharded along ``dst_dim``
(the balanced partition, or the one given).  Rank ``r`` cuts its slab along
``dst_dim`` into the pieces each rank will own and sends piece ``q`` to rank ``q``;
it receives from every rank ``s`` that rank's rows along ``src_dim`` of its own
piece, and joins them along ``src_dim`` in rank order.  Each rank sends
``(P-1)/P`` of its slab (its own piece stays), the least any move of the shard
can send.  The backward is autograd's through the functional collective: the
reverse move.

Complex tensors travel as their real views.  ``seq_to_channels`` /
``channels_to_seq`` are the move for a ``[B, C, L]`` sequence: sequence-sharded
to channel-sharded and back (a long convolution over the whole sequence runs on
the channel shard between them).
"""

from __future__ import annotations

import torch

from .domain import Domain, _all_lengths
from .errors import FxHaloError

__all__ = ["redistribute", "redistribute_slab", "seq_to_channels", "channels_to_seq"]


def redistribute_slab(
    x: torch.Tensor,
    src_dim: int,
    dst_dim: int,
    group_name: str,
    src_lengths: tuple[int, ...],
    dst_lengths: tuple[int, ...],
    rank: int,
) -> torch.Tensor:
    """The kernel: ``x`` (rows ``src_lengths[rank]`` of ``src_dim``, all of ``dst_dim``) becomes this
    rank's ``dst_lengths[rank]`` rows of ``dst_dim`` with all of ``src_dim``.  Graph-traceable: every
    size is a Python number."""
    if x.is_complex():
        out = redistribute_slab(
            torch.view_as_real(x.resolve_conj()),
            src_dim % x.ndim,
            dst_dim % x.ndim,
            group_name,
            src_lengths,
            dst_lengths,
            rank,
        )
        return torch.view_as_complex(out)
    src_dim, dst_dim = src_dim % x.ndim, dst_dim % x.ndim
    if src_dim == dst_dim:
        raise FxHaloError(f"redistribute: the shard is already along dim {src_dim}")
    if x.shape[dst_dim] != sum(dst_lengths) or x.shape[src_dim] != src_lengths[rank]:
        raise FxHaloError(
            f"redistribute: a slab of shape {tuple(x.shape)} does not hold rows {src_lengths[rank]} of dim "
            f"{src_dim} and all {sum(dst_lengths)} of dim {dst_dim}"
        )
    pieces = x.split(list(dst_lengths), dim=dst_dim)  # piece q goes to rank q
    other = x.numel() // (x.shape[src_dim] * x.shape[dst_dim])  # elements per (src row, dst row)
    send = torch.cat([p.reshape(-1) for p in pieces])
    send_sizes = [src_lengths[rank] * n * other for n in dst_lengths]
    recv_sizes = [n * dst_lengths[rank] * other for n in src_lengths]
    got = torch.ops._c10d_functional.all_to_all_single(send, recv_sizes, send_sizes, group_name)
    got = torch.ops._c10d_functional.wait_tensor(got)
    shape = list(x.shape)
    shape[dst_dim] = dst_lengths[rank]
    parts = []
    for n, flat in zip(src_lengths, got.split(recv_sizes)):
        shape[src_dim] = n
        parts.append(flat.reshape(shape))
    return torch.cat(parts, dim=src_dim)


def redistribute(x: torch.Tensor, src_dim: int, dst_dim: int, group=None, dst_lengths=None) -> torch.Tensor:
    """This rank's slab of ``x``'s global tensor, sharded along ``dst_dim`` instead of ``src_dim``.

    ``x`` is this rank's slab along ``src_dim`` (any partition: one small all-gather of
    the local lengths learns it); the result follows ``dst_lengths`` (every rank's rows
    of ``dst_dim``), the balanced partition by default.  Differentiable.
    """
    domain = Domain.from_group(group, shard_dim=src_dim)
    if domain.size == 1:
        return x
    src = tuple(_all_lengths(int(x.shape[src_dim]), domain))
    n = int(x.shape[dst_dim])
    if dst_lengths is None:
        dst_lengths = list(domain.lengths(n))
    dst = tuple(int(d) for d in dst_lengths)
    if sum(dst) != n or len(dst) != domain.size:
        raise FxHaloError(f"redistribute: dst_lengths {dst} do not split {n} rows over {domain.size} ranks")
    return redistribute_slab(x, src_dim, dst_dim, domain.group_name, src, dst, domain.rank)


def seq_to_channels(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[B, C, L_local]`` (sequence-sharded) -> ``[B, C_local, L]`` (channel-sharded, balanced)."""
    return redistribute(x, -1, -2, group)


def channels_to_seq(x: torch.Tensor, group=None) -> torch.Tensor:
    """``[B, C_local, L]`` (channel-sharded) -> ``[B, C, L_local]`` (sequence-sharded, balanced)."""
    return redistribute(x, -2, -1, group)
