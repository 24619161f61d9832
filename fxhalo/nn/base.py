"""The base of every eager wrapper: the group a layer works in, state-dict adoption, gradient sums."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..domain import Domain, resolve_group
from ..errors import FxHaloError


def group_name_of(group) -> str | None:
    """The name of a group given as a ProcessGroup, a name, a DeviceMesh or ``(mesh, axis)``.

    ``None`` stays ``None`` (WORLD, looked up at call time, so a model may be
    converted before ``init_process_group``).  A name, not the group object, is
    what a module keeps: names survive ``copy.deepcopy`` and pickling.
    """
    if group is None or isinstance(group, str):
        return group
    return resolve_group(group).group_name


def _domain(group_name: str | None, shard_dim: int) -> Domain | None:
    """The domain a wrapper works in now, or None when it should run the plain op."""
    if group_name is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group_name = dist.group.WORLD.group_name
    domain = Domain.from_group(group_name, shard_dim=shard_dim)
    return domain if domain.size > 1 else None


def reduce_gradients(module: nn.Module, group=None) -> None:
    """Sum every parameter gradient of ``module`` over the domain group, in place.

    Each rank's backward gives a partial gradient (the contribution of its slab);
    the sum is one device's gradient.  Call it after ``backward()`` and before the
    optimizer step.  The gradients are *summed*, not averaged: each rank's part
    of the loss is a part of one device's loss, not a sample of it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    pg = resolve_group(group)
    if dist.get_world_size(pg) == 1:
        return
    # One all_reduce per dtype and device, not one per parameter.
    buckets: dict = {}
    for p in module.parameters():
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=pg)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))


def batched_spatial_index(shard_dim: int, nd: int):
    """The spatial dim index (0 = first) of an ``nd``-D layer's batched input that ``shard_dim`` names.

    What convert and validate_sharding_constraints, which see no tensor, read a shard_dim as.

    ``"batch"`` for dim 0, ``"channel"`` for the channel dim (a non-negative
    ``shard_dim`` counts on the batched input ``(N, C, *spatial)``).
    """
    d = shard_dim + nd + 2 if shard_dim < 0 else shard_dim
    if d == 0:
        return "batch"
    if d == 1 or not 0 <= d < nd + 2:
        return "channel"
    return d - 2


class _Wrapper(nn.Module):
    """Adopts the wrapped module's parameters, buffers and children under the same names.

    The wrapped module itself is not kept: holding it would leave a second,
    stale owner of the parameters after ``.to()`` or ``load_state_dict``
    replaces them.  Subclasses copy the configuration they need.
    """

    #: torch.nn types a wrapper accepts
    wraps: tuple[type, ...] = ()

    def _accept(self, module: nn.Module) -> None:
        """Raise unless ``module`` is one of :attr:`wraps`, with its parameters initialised."""
        if self.wraps and not isinstance(module, self.wraps):
            names = ", ".join(t.__name__ for t in self.wraps)
            raise FxHaloError(f"{type(self).__name__} wraps {names}, not {type(module).__name__}")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise FxHaloError(
                f"{type(self).__name__}: {type(module).__name__} has uninitialised (lazy) parameters. Remedy: "
                "run one forward pass on one device first, or build the non-lazy layer"
            )

    def __init__(self, module: nn.Module, shard_dim: int, group):
        self._accept(module)
        super().__init__()
        self.shard_dim = int(shard_dim)
        self.group_name = group_name_of(group)
        self.wrapped_type = type(module)
        self.training = module.training
        # The state dict records each module's _version; keep the wrapped one's.
        self._version = getattr(module, "_version", 1)
        for name, p in module._parameters.items():
            self.register_parameter(name, p)
        for name, b in module._buffers.items():
            self.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module._modules.items():
            self.add_module(name, child)

    def domain(self) -> Domain | None:
        return _domain(self.group_name, self.shard_dim)

    def _sharded_dim(self, x: torch.Tensor, d: int, spatial: int) -> int | None:
        """``d``, the sharded dim of ``x``, when it is one of the op's ``spatial`` last dims.

        None when it is the batch dim (the op is then local); raises when it is a
        channel dim, which these ops mix or normalise.
        """
        if d >= x.ndim - spatial:
            return d
        if d == 0 and x.ndim == spatial + 2:
            return None
        raise FxHaloError(
            f"{type(self).__name__}: shard_dim={self.shard_dim} names dim {d}, a channel dim of its "
            f"{x.ndim}-D input {tuple(x.shape)}; the op mixes or normalises channels, so only a spatial dim (or the "
            "batch dim) may be sharded. Pass the shard_dim of a spatial dim."
        )

    def extra_repr(self) -> str:
        group = "WORLD" if self.group_name is None else repr(self.group_name)
        return f"{self.wrapped_type.__name__}, shard_dim={self.shard_dim}, group={group}"
