"""Ops declared local, in one place.

* **Elementwise** ops (arithmetic, activations, dropout, dtype casts): every output
  element depends on the same position of each input, so they are local as long
  as all sharded inputs agree on the sharded dim and no replicated input spans it.
* **Channel-only** ops (``F.prelu``, whose weight is per channel): local as long as
  the dim they weight is not the sharded one.  (``F.linear``, which contracts its last
  dim, lives in :mod:`fxhalo.rules.matmul`.)  (Softmax,
  local over another dim and global along the sharded one, lives in
  :mod:`fxhalo.rules.reduce`.)

Anything not listed here, and not handled by another rule, is refused when it
reads a sharded value.
"""

from __future__ import annotations

import operator

import torch

from ..layout import example_value, is_tensor_node, sharding_of
from . import Decision, LayoutRule, Rule, register, register_op

_ELEMENTWISE_NAMES = (
    "add sub mul div true_divide floor_divide remainder pow neg abs exp expm1 log log1p log2 "
    "log10 sqrt rsqrt sin cos tan tanh sigmoid relu clamp clamp_min clamp_max clip where "
    "maximum minimum erf erfc sign square reciprocal lerp addcmul addcdiv nan_to_num floor "
    "ceil round trunc frac logical_not logical_and logical_or isnan isfinite isinf "
    "masked_fill rsub atan2 hypot fmod copysign zeros_like ones_like empty_like full_like "
    "rand_like randn_like"
).split()
_ACTIVATIONS = (
    "relu relu6 leaky_relu gelu silu mish elu selu celu softplus hardtanh hardswish "
    "hardsigmoid sigmoid tanh logsigmoid softsign tanhshrink threshold rrelu "
    "dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d"
).split()
_OPERATORS = (
    "add sub mul truediv floordiv pow neg pos abs mod and_ or_ xor invert "
    "eq ne lt le gt ge iadd isub imul itruediv ipow"
).split()
#: method-only spellings (the named ops above get their methods and in-place forms from register_op)
_METHODS = (
    "float half bfloat16 double int long bool to type type_as contiguous clone detach requires_grad_ zero_ fill_"
).split()
#: methods whose output follows only their first (tensor) argument
_FIRST_ARG_ONLY = {"to", "type", "type_as"}


class Elementwise(LayoutRule):
    """Output sharded like the (broadcast) inputs."""

    name = "local"

    def layout(self, node, ctx):
        out = example_value(node)
        inputs = [a for a in node.all_input_nodes if is_tensor_node(a)]
        if node.op == "call_method" and node.target in _FIRST_ARG_ONLY:
            inputs = inputs[:1]
        sharded = [(a, sharding_of(a)) for a in inputs if sharding_of(a) is not None]
        if not sharded:
            return None
        if not isinstance(out, torch.Tensor):
            ctx.refuse(
                node,
                "returns a non-tensor computed from a sharded tensor",
                "compute it from fxhalo.gather()ed values outside the compiled region",
            )
        # Broadcasting aligns dims from the right: compare positions counted from the end.
        positions = {s.dim - example_value(a).ndim for a, s in sharded}
        first = sharded[0][1]
        if len(positions) != 1 or not all(first.same_layout(s) for _, s in sharded):
            ctx.refuse(
                node,
                "combines tensors sharded along different dims or with different sizes: "
                + ", ".join(f"{a.name} {s}" for a, s in sharded),
                "make the operands agree (same sharded dim and size) before combining them",
            )
        pos = positions.pop()
        for a in inputs:
            if sharding_of(a) is None:
                shape = example_value(a).shape
                if len(shape) >= -pos and shape[pos] != 1:
                    ctx.refuse(
                        node,
                        f"broadcasts replicated tensor '{a.name}' of shape {tuple(shape)} "
                        f"against the sharded dim (size {shape[pos]} there)",
                        "shard that tensor too (pass it as a sharded input), or give it size 1 along the sharded dim",
                    )
        return first.moved(out.ndim + pos)


class ChannelOnly(Rule):
    """Ops that mix values along one dim only; local when that dim is not the sharded one."""

    name = "local"

    def __init__(self, dim_of):
        self._dim_of = dim_of  # (node) -> the dim the op mixes, non-negative

    def decide(self, node, ctx) -> Decision:
        src = node.all_input_nodes[0]
        s = sharding_of(src)
        if s is None:
            return Decision()
        for a in node.all_input_nodes[1:]:
            if sharding_of(a) is not None:
                ctx.refuse(node, f"takes sharded tensor '{a.name}' as a parameter", "pass replicated parameters")
        mixed = self._dim_of(node)
        if mixed == s.dim:
            ctx.refuse(
                node,
                f"mixes values along dim {mixed}, the sharded dim",
                "apply it along another dim, or gather the tensor first",
            )
        out = example_value(node)
        return Decision(s.moved(s.dim + out.ndim - example_value(src).ndim))


ELEMENTWISE = Elementwise()


register_op(ELEMENTWISE, *_ELEMENTWISE_NAMES, *_ACTIVATIONS, inplace=True)
register(ELEMENTWISE, *(getattr(operator, n) for n in _OPERATORS))
register(ELEMENTWISE, *_METHODS, op="call_method")

# PReLU's weight is per channel (dim 1): local unless the channel dim itself is sharded
register_op(ChannelOnly(lambda node: 1), "prelu")


# -- the same table for torch.nn modules ----------------------------------------------
# fxhalo.convert_to_domain_parallel judges modules, not graph ops: it reads locality here.

_MODULE_OPS = (
    "ReLU:relu ReLU6:relu6 LeakyReLU:leaky_relu RReLU:rrelu ELU:elu SELU:selu CELU:celu GELU:gelu SiLU:silu "
    "Mish:mish Sigmoid:sigmoid Tanh:tanh Hardtanh:hardtanh Hardswish:hardswish Hardsigmoid:hardsigmoid "
    "Softplus:softplus Softsign:softsign Tanhshrink:tanhshrink LogSigmoid:logsigmoid Threshold:threshold "
    "Dropout:dropout Dropout1d:dropout1d Dropout2d:dropout2d Dropout3d:dropout3d AlphaDropout:alpha_dropout "
    "FeatureAlphaDropout:feature_alpha_dropout"
).split()
#: torch.nn module type -> the elementwise op or activation of the lists above that its forward applies
MODULE_OPS: dict[type, str] = {
    getattr(torch.nn, c): op for c, op in (p.split(":") for p in _MODULE_OPS) if op in _ELEMENTWISE_NAMES + _ACTIVATIONS
}
#: torch.nn module types local for another reason: the identity and the containers; elementwise
#: modules whose functional form has no compiled rule yet (shrinks, PReLU's per-channel weight);
#: pixel (un)shuffle (blocks of r rows stay in a shard whose length r divides: torch raises
#: otherwise; the compiled rule is in rules/shift.py); channel-only mixing (channel shuffle, LRN).
OTHER_LOCAL_MODULES: tuple[type, ...] = tuple(
    getattr(torch.nn, c)
    for c in (
        "Identity Sequential ModuleList ModuleDict Softshrink Hardshrink PReLU PixelShuffle PixelUnshuffle "
        "ChannelShuffle LocalResponseNorm CrossMapLRN2d"
    ).split()
)
#: torch.nn module types local under any sharding (what convert leaves in place)
LOCAL_MODULES: tuple[type, ...] = (*MODULE_OPS, *OTHER_LOCAL_MODULES)
#: torch.nn module type -> the dim it mixes, counted from the end: local when that dim is not the
#: sharded one (as the compiled ``F.linear`` rule, :mod:`fxhalo.rules.matmul`, finds it local)
CHANNEL_ONLY_MODULES: dict[type, int] = {torch.nn.Linear: -1, torch.nn.LazyLinear: -1, torch.nn.Bilinear: -1}
