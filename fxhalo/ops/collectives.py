"""The collective primitives every kernel uses: a sum over the group and a stacked all_gather.

Both are functional collectives, so the backward is whatever autograd derives from
them: an ``all_reduce``'s backward is an ``all_reduce``, an ``all_gather``'s a
``reduce_scatter``.

On gloo, a sum or a gather of up to :data:`EXCHANGE_SUM_MAX_BYTES` travels by one
``all_to_all_single`` instead of an ``all_reduce`` or ``all_gather`` (forward and
backward alike): it is several times faster there.  See :func:`all_reduce_sum`.

**Gradient convention.**  Inside a compiled graph the gradient that a rank holds for
a *replicated* value is a partial one: the true gradient is the sum over the domain
group.  That is what the functional ``all_reduce``'s autograd formula (backward = an
``all_reduce`` of the gradients) assumes, and it is how parameter gradients already
work (each rank holds a partial one).  A replicated statistic consumed by sharded
rows (a norm's mean) therefore gets the cross-rank terms of its gradient summed in
the backward, which is what makes the backward exact.  At the graph's boundary,
replicated tensors carry their *full* gradient on every rank, as for
:func:`fxhalo.gather`: ``loss.backward()`` on every rank is right.
:mod:`fxhalo.ops.grad` converts between the two, and :mod:`fxhalo.passes.boundary`
inserts the conversions at the graph's inputs and outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers autograd for _c10d_functional ops)

from ..domain import resolve_group

__all__ = [
    "group_size",
    "EXCHANGE_SUM_MAX_BYTES",
    "sums_by_exchange",
    "all_reduce_sum",
    "all_gather_stacked",
]


def group_size(group_name: str) -> int:
    return dist.get_world_size(resolve_group(group_name))


#: Sums of at most this many bytes travel by exchange on gloo (see :func:`all_reduce_sum`).
EXCHANGE_SUM_MAX_BYTES = 64 * 1024


def sums_by_exchange(t: torch.Tensor, group_name: str) -> bool:
    """True when :func:`all_reduce_sum` adds ``t`` up with an ``all_to_all_single`` instead of an ``all_reduce``
    (and :func:`all_gather_stacked` gathers it so instead of an ``all_gather``).

    Only CPU tensors on gloo, up to :data:`EXCHANGE_SUM_MAX_BYTES`.  The backend is the
    same on every rank, so every rank decides the same.
    """
    if t.device.type != "cpu" or t.numel() * t.element_size() > EXCHANGE_SUM_MAX_BYTES:
        return False
    return "gloo" in str(dist.get_backend(resolve_group(group_name)))


def all_reduce_sum(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of ``t`` over the group, on every rank; its backward sums the gradients (partial -> full).

    One collective.  On NCCL (and on gloo for large tensors) an ``all_reduce``.  On
    gloo, a small tensor goes to every rank with one ``all_to_all_single`` and each
    rank adds the copies up itself: gloo's all_reduce of a few KiB takes several
    round trips, about 0.4-3.6 ms on 2 ranks with compute between the calls, against
    0.16-0.46 ms for the exchange (docs/performance.md).  Every rank adds the same
    copies in rank order, its own included, so the sums are bit-identical across
    ranks, as an all_reduce's are.  The exchange's backward is an exchange that
    returns each copy's gradient to its sender, where the copies' gradients add up:
    the same partial -> full sum as the all_reduce's backward.
    """
    if t.is_complex():  # collectives take real tensors: sum the real view
        return torch.view_as_complex(all_reduce_sum(torch.view_as_real(t.resolve_conj()), group_name))
    t = t.contiguous()
    if sums_by_exchange(t, group_name):
        return _copies_from_every_rank(t, group_name).sum(0)
    out = torch.ops._c10d_functional.all_reduce(t, "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def all_gather_stacked(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Every rank's ``t``, stacked along a new dim 0 (rank order); backward is a reduce-scatter.

    One collective: an ``all_gather``, or on gloo, for a small ``t`` (as :func:`sums_by_exchange`
    decides), one ``all_to_all_single`` that sends ``t`` to every rank, for the same reason as
    :func:`all_reduce_sum`'s exchange.  Its backward returns each copy's gradient to its sender,
    where they add up: the reduce-scatter."""
    t = t.contiguous()
    if sums_by_exchange(t, group_name):
        return _copies_from_every_rank(t, group_name)
    out = torch.ops._c10d_functional.all_gather_into_tensor(t.unsqueeze(0), group_size(group_name), group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _copies_from_every_rank(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Every rank's (contiguous) ``t``, stacked along a new dim 0 in rank order, by one ``all_to_all_single``
    that sends ``t`` to every rank; its backward returns each copy's gradient to its sender."""
    size, n = group_size(group_name), t.numel()
    copies = t.reshape(1, n).expand(size, n).reshape(size * n)
    got = torch.ops._c10d_functional.all_to_all_single(copies, [n] * size, [n] * size, group_name)
    return torch.ops._c10d_functional.wait_tensor(got).view(size, *t.shape)
