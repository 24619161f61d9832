"""``convert_to_domain_parallel``: put the eager layers of :mod:`fxhalo.nn` into a model.

The walk decides from each module's *type* (and its configuration) whether it
touches the sharded dim, through a registry of handlers (one per family, filled
by :func:`handles`).  A handler answers one of three ways:

* **local**: the module never reaches across rows of the sharded dim
  (activations, dropout, 1x1 convs, a ``Linear`` over the last dim when the last
  dim is not the sharded one, ...); it is left as it is.  Which module types are
  local comes from the compiled path's table, :mod:`fxhalo.rules.local`
  (``LOCAL_MODULES``, ``CHANNEL_ONLY_MODULES``);
* **a replacement**: a wrapper from :mod:`fxhalo.nn` (convs, transposed convs,
  group/instance/batch norm, pooling, global pooling and softmax along the sharded
  dim, ``nn.Upsample``);
* **a refusal**: the module touches the sharded dim and fxhalo has no eager layer
  for it (``LayerNorm`` over the spatial dims, padding modules along the sharded
  dim, recurrent and attention layers, ...), or convert cannot tell.

A module of a type no handler knows is walked into when it is a plain container
(children, but no parameters or buffers of its own: the user's ``Block`` and
``UNet`` classes).  Otherwise (a leaf, or a module with its own parameters) it is
refused: convert cannot see what its ``forward`` does.  A subclass of a known type
that overrides ``forward`` counts as unknown.

All refusals are collected and raised together in one
:class:`~fxhalo.errors.FxHaloError` naming each module's path, and the model is
changed only when there are none.

What convert cannot see: functional calls in a container's own ``forward``
(``F.interpolate``, ``F.pad``, ``x.mean(dim=2)``) run on the local slab as they are.
:func:`fxhalo.validate` and the ``domain_parallel`` compile path see every op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

from . import nn as dp
from .constraints import validate_sharding_constraints
from .depthwise import DistributedDepthwiseConv1d, DistributedDepthwiseConv2d
from .errors import FxHaloError
from .nn.base import batched_spatial_index as _spatial_index
from .nn.resample import pools_to_one
from .ops.conv import padding_edge
from .rules import local as local_rules

__all__ = ["convert_to_domain_parallel", "validate_sharding_constraints", "handles", "Refuse"]


class Refuse(Exception):
    """Raised by a handler: the module touches the sharded dim and cannot be converted."""

    def __init__(self, problem: str, remedy: str = ""):
        super().__init__(problem)
        self.problem, self.remedy = problem, remedy


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every handler is given besides the module."""

    shard_dim: int
    group: object


_LOCAL = object()  # a handler's "leave it" answer
_HANDLERS: dict[type, Callable] = {}


def handles(*types: type):
    """Register ``fn(module, setting)`` for ``types``: returns a replacement, ``None`` (local) or raises Refuse."""

    def register(fn):
        for t in types:
            _HANDLERS[t] = fn
        return fn

    return register


# Methods whose override in a subclass changes what a known layer computes.
_BEHAVIOUR = ("forward", "_conv_forward", "_output_padding")


def _handler_for(module: nn.Module):
    cls = type(module)
    if cls in _HANDLERS:
        return _HANDLERS[cls]
    for base in cls.__mro__[1:]:
        if base in _HANDLERS:
            same = all(getattr(cls, m, None) is getattr(base, m, None) for m in _BEHAVIOUR)
            return _HANDLERS[base] if same else None
    return None


# -- which dim a layer acts on ------------------------------------------------------


def _mixes_channels(module, s: Setting, nd: int):
    sdim = _spatial_index(s.shard_dim, nd)
    if sdim == "channel":
        raise Refuse(
            f"would see shard_dim={s.shard_dim} as the channel dim of its (N, C, {nd} spatial) input, "
            "and it mixes or normalises channels",
            "pass the shard_dim of a spatial dim (negative dims count from the end)",
        )
    return sdim


def _may_act_on(dims, shard_dim: int) -> bool | None:
    """Does a layer acting on tensor ``dims`` act on ``shard_dim``?  None: cannot tell.

    Two dims of the same sign compare directly; otherwise the answer depends on
    the rank of a tensor convert never sees.
    """
    unknown = False
    for d in dims:
        if d is None:
            return None
        if (d < 0) == (shard_dim < 0):
            if d == shard_dim:
                return True
        else:
            unknown = True
    return None if unknown else False


def _refuse_if_acts_on(module, s: Setting, dims, what: str):
    hit = _may_act_on(dims, s.shard_dim)
    if hit is False:
        return _LOCAL
    name = type(module).__name__
    if hit:
        raise Refuse(
            f"{what} (dims {tuple(dims)}), which includes the sharded dim {s.shard_dim}; fxhalo has no "
            "eager layer for it",
            f"keep {name} off the sharded dim, or compile the model with backend='domain_parallel'",
        )
    raise Refuse(
        f"{what} (dims {tuple(dims)}); whether that is the sharded dim {s.shard_dim} depends on the "
        "input's rank, which convert does not see",
        f"pass a shard_dim of the same sign as the layer's dims, or allow_unconverted=({name},) if it is not",
    )


# -- handlers -----------------------------------------------------------------------


@handles(*local_rules.LOCAL_MODULES)
def _local(module, s):
    return _LOCAL


@handles(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(module, s):
    nd = len(module.kernel_size)
    sdim = _mixes_channels(module, s, nd)
    if sdim == "batch":
        return _LOCAL
    # The rows it reads past the edges of the sharded dim: its padding, whatever the mode.
    edge, _ = padding_edge(module.padding_mode, module._reversed_padding_repeated_twice, sdim + 2, nd + 2)
    if module.kernel_size[sdim] == 1 and module.stride[sdim] == 1 and edge.extent == (0, 0):
        return _LOCAL  # reads only its own row along the sharded dim: no halo, nothing to wrap
    return dp.CONVS[nd](module, s.shard_dim, s.group)


@handles(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(module, s):
    nd = len(module.kernel_size)
    if _mixes_channels(module, s, nd) == "batch":
        return _LOCAL
    return dp.CONV_TRANSPOSES[nd](module, s.shard_dim, s.group)


@handles(nn.GroupNorm)
def _group_norm(module, s):
    return dp.DomainParallelGroupNorm(module, s.shard_dim, s.group)


@handles(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instance_norm(module, s):
    return dp.DomainParallelInstanceNorm(module, s.shard_dim, s.group)


@handles(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module, s):
    return dp.DomainParallelBatchNorm(module, s.shard_dim, s.group)


@handles(nn.SyncBatchNorm)
def _sync_batch_norm(module, s):
    raise Refuse(
        "synchronises its statistics over its own (data-parallel) process group, not the domain group",
        "build the model with nn.BatchNorm*d, convert, then sync over the data-parallel group yourself",
    )


@handles(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(module, s):
    n = len(module.normalized_shape)
    if _may_act_on(tuple(range(-n, 0)), s.shard_dim) is False:
        return _LOCAL
    # Over the sharded dim (or maybe, depending on the input's rank: the wrapper decides per call).
    return dp.DomainParallelLayerNorm(module, s.shard_dim, s.group)


@handles(*local_rules.CHANNEL_ONLY_MODULES)
def _channel_only(module, s):
    dim = local_rules.CHANNEL_ONLY_MODULES[next(t for t in local_rules.CHANNEL_ONLY_MODULES if isinstance(module, t))]
    return _refuse_if_acts_on(module, s, (dim,), f"mixes its input's dim {dim}")


@handles(nn.Softmax, nn.LogSoftmax)
def _softmax(module, s):
    if module.dim is not None and _may_act_on((module.dim,), s.shard_dim):
        return dp.DomainParallelSoftmax(module, s.shard_dim, s.group)  # a global max and sum along it
    return _refuse_if_acts_on(module, s, (module.dim,), "acts along a dim")


@handles(nn.Softmin, nn.GLU)
def _along_dim(module, s):
    return _refuse_if_acts_on(module, s, (module.dim,), "acts along a dim")


@handles(nn.Softmax2d)
def _softmax2d(module, s):
    return _refuse_if_acts_on(module, s, (-3,), "acts along the channel dim")


@handles(nn.Flatten)
def _flatten(module, s):
    a, b = module.start_dim, module.end_dim
    if a == b:
        return _LOCAL
    what = f"merges dims {a}..{b} into one"
    if (a < 0) == (b < 0) == (s.shard_dim < 0):
        return _refuse_if_acts_on(module, s, (s.shard_dim,), what) if a <= s.shard_dim <= b else _LOCAL
    return _refuse_if_acts_on(module, s, (a, b), what)


@handles(nn.Unflatten)
def _unflatten(module, s):
    return _refuse_if_acts_on(module, s, (module.dim,), "splits a dim")


_PADS = {
    t: nd
    for nd in (1, 2, 3)
    for t in (
        getattr(nn, f"ZeroPad{nd}d"),
        getattr(nn, f"ConstantPad{nd}d"),
        getattr(nn, f"ReflectionPad{nd}d"),
        getattr(nn, f"ReplicationPad{nd}d"),
        getattr(nn, f"CircularPad{nd}d"),
    )
}


@handles(*_PADS)
def _pad(module, s):
    nd = _PADS[next(t for t in _PADS if isinstance(module, t))]
    sdim = _spatial_index(s.shard_dim, nd)
    if not isinstance(sdim, int):
        return _LOCAL  # pads spatial dims only
    i = nd - 1 - sdim  # F.pad order: last dim first
    if module.padding[2 * i] or module.padding[2 * i + 1]:
        raise Refuse(
            f"pads the sharded dim by {tuple(module.padding[2 * i : 2 * i + 2])} rows on one rank's slab, "
            "where only the global edges should be padded",
            "move the pad into the following conv (padding=..., padding_mode=...), or replace the "
            "pad-and-conv module with a custom converter (e.g. DomainParallelPeriodicConv2d)",
        )
    return _LOCAL


@handles(*dp.POOLS)
def _pool(module, s):
    nd = dp.POOLS[next(t for t in dp.POOLS if isinstance(module, t))][1]
    sdim = _spatial_index(s.shard_dim, nd)
    if not isinstance(sdim, int):
        return _LOCAL  # pooling never mixes planes
    size = getattr(module, "output_size", None)
    sizes = list(size) if isinstance(size, (tuple, list)) else [size] * nd
    if size is not None and sizes[sdim] == 1 and not pools_to_one(module, sdim):
        raise Refuse(
            "pools the sharded dim to one row with return_indices=True: indices of a reduction over all ranks",
            "pool the values only, compile the model with backend='domain_parallel', or gather before pooling",
        )
    return dp.DomainParallelPool(module, s.shard_dim, s.group)  # pooling to one row: a global reduction


@handles(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample(module, s):
    return dp.DomainParallelInterpolate.from_upsample(module, s.shard_dim, s.group)


class _InPlace:
    """A handler's answer that changes the module itself, once the whole model is accepted."""

    def __init__(self, apply: Callable[[], None]):
        self.apply = apply


@handles(DistributedDepthwiseConv1d, DistributedDepthwiseConv2d)
def _depthwise(module, s):
    if _mixes_channels(module, s, module.nd) == "batch":
        return _LOCAL

    def switch_on():  # the module shards a spatial dim itself; convert only switches that on
        module.domain_parallel = True
        module.domain_group_name = dp.group_name_of(s.group)
        module.shard_dim = s.shard_dim

    return _InPlace(switch_on)


# -- the walk -----------------------------------------------------------------------

_CONVERTED = (dp._Wrapper, dp.DomainParallelInterpolate)


def convert_to_domain_parallel(
    model: nn.Module, group=None, shard_dim: int = -2, custom_converters=None, allow_unconverted=()
) -> nn.Module:
    """Replace, in place, every layer of ``model`` that reaches across the sharded dim; return ``model``.

    ``group``: a ProcessGroup, its name, a DeviceMesh or ``(mesh, axis)``; ``None``
    is WORLD, looked up when the layers run (so a model may be converted before
    ``init_process_group``; without one, or with one rank, it runs as before).
    ``shard_dim``: the sharded tensor dim, the same for every layer's input
    (negative dims count from the end, which lets convert judge layers that act
    on the last dims).

    ``custom_converters``: ``{type: fn(module) -> replacement}``, tried first (by
    ``isinstance``, in order); the replacement's children are not visited.
    Returning the module itself (or None) leaves it, and its children, unchanged.

    ``allow_unconverted``: types accepted as they are although convert would
    refuse them (you state that they do not touch the sharded dim); their
    children are still visited.

    Raises :class:`~fxhalo.errors.FxHaloError` listing the path, type and reason
    of every module that touches the sharded dim and has no converter; the model
    is then unchanged.
    """
    setting = Setting(int(shard_dim), group)
    custom = dict(custom_converters or {})
    allowed = tuple(allow_unconverted)
    changes: list[tuple[nn.Module | None, str, object]] = []  # (parent, name, replacement or _InPlace)
    problems: list[str] = []
    done: dict[int, object] = {}  # a module shared by two parents is converted once

    def record(parent, name, module, new) -> None:
        done[id(module)] = new
        if new is not module:
            changes.append((parent, name, new))

    def visit(parent, name: str, path: str, module: nn.Module) -> None:
        where = f"{path or '<model>'} ({type(module).__name__})"
        if id(module) in done:
            if done[id(module)] is not module and not isinstance(done[id(module)], _InPlace):
                changes.append((parent, name, done[id(module)]))
            return
        if isinstance(module, _CONVERTED):
            return
        for cls, fn in custom.items():
            if isinstance(module, cls):
                try:
                    new = fn(module)
                except FxHaloError as e:
                    problems.append(f"{where}: {e}")
                    return
                record(parent, name, module, module if new is None else new)
                return
        handler = None if isinstance(module, allowed) else _handler_for(module)
        if handler is not None:
            try:
                new = handler(module, setting)
            except Refuse as e:
                problems.append(f"{where} {e.problem}. Remedy: {e.remedy or 'add a custom converter'}.")
                return
            except FxHaloError as e:  # a wrapper refused the module (e.g. lazy parameters)
                problems.append(f"{where}: {e}")
                return
            if new is not _LOCAL:
                record(parent, name, module, new)
                return
        elif not isinstance(module, allowed):
            own = [n for n, _ in module.named_parameters(recurse=False)] + [
                n for n, _ in module.named_buffers(recurse=False)
            ]
            if own or not module._modules:
                what = (
                    f"has parameters/buffers of its own ({', '.join(own)}) that a forward convert cannot see uses"
                    if own
                    else "is a layer type convert does not know"
                )
                cls_name = type(module).__name__
                problems.append(
                    f"{where} {what}, so it may touch the sharded dim. Remedy: pass "
                    f"custom_converters={{{cls_name}: ...}} to replace it, or allow_unconverted=({cls_name},) "
                    f"if it never reaches across rows of dim {shard_dim}."
                )
                return
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            visit(module, child_name, f"{path}.{child_name}" if path else child_name, child)

    visit(None, "", "", model)
    if problems:
        raise FxHaloError(
            f"convert_to_domain_parallel: {len(problems)} module(s) touch the sharded dim {shard_dim} and "
            "have no converter:\n  " + "\n  ".join(problems)
        )
    for parent, name, new in changes:
        if isinstance(new, _InPlace):
            new.apply()
        elif parent is None:
            model = new
        else:
            parent._modules[name] = new
    return model
