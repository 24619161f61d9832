"""The one exception fxhalo raises, and the helpers that make its messages useful."""

from __future__ import annotations

import os

import torch

__all__ = ["FxHaloError", "user_source", "describe_node"]

# Frames from these trees are library internals, not "the user's line".
_INTERNAL_DIRS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


class FxHaloError(RuntimeError):
    """Raised when fxhalo cannot make an op domain-parallel, or a setup is inconsistent.

    Messages name the op, the user's source line where one is known, the sizes
    involved and what to do instead.
    """


def user_source(node) -> str:
    """Best description of where an FX node came from in the user's code.

    Dynamo records a formatted traceback in ``node.meta["stack_trace"]``; the
    user's line is its last frame that lies outside torch and fxhalo.  Modules
    that are pure torch (an ``nn.Sequential`` of built-in layers) leave no user
    frame, so the module path from ``nn_module_stack`` is the fallback.
    """
    meta = getattr(node, "meta", {}) or {}
    frames = []
    lines = (meta.get("stack_trace") or "").splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith('File "'):
            continue
        path, _, rest = line[len('File "') :].partition('"')
        lineno = rest.split("line", 1)[-1].split(",", 1)[0].strip()
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        frames.append((path, lineno, code))
    user = [f for f in frames if not f[0].startswith(_INTERNAL_DIRS)]
    if user:
        path, lineno, code = user[-1]
        return f"{path}:{lineno}: {code}" if code else f"{path}:{lineno}"
    stack = meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        name = getattr(cls, "__name__", str(cls))
        return f"module {path} ({name})"
    if frames:
        path, lineno, code = frames[-1]
        return f"{path}:{lineno}: {code}"
    return "<source unknown>"


def _public_name(target) -> str:
    """How a user would spell a graph target: ``torch.conv2d``, ``torch.nn.functional.pad``, ``operator.add``."""
    import operator

    import torch.nn.functional as F

    name = getattr(target, "__name__", None)
    if name is None:
        return str(target)
    for prefix, ns in (
        ("torch", torch),
        ("torch.nn.functional", F),
        ("torch.fft", torch.fft),
        ("torch.special", torch.special),
        ("torch.linalg", torch.linalg),
        ("operator", operator),
        ("torch._C._nn", torch._C._nn),
    ):
        if getattr(ns, name, None) is target:
            if ns is torch._C._nn and hasattr(F, name):  # F.pad and friends call these builtins
                return f"torch.nn.functional.{name}"
            return f"{prefix}.{name}"
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


def describe_node(node) -> str:
    """``node 'conv2d' (torch.conv2d) at file:line`` for error messages."""
    spelled = f"Tensor.{node.target}" if node.op == "call_method" else _public_name(node.target)
    return f"node '{node.name}' ({spelled}) at {user_source(node)}"
