"""One Dynamo trace of a model on one rank's input, for the one-process tools (explain, validate).

:func:`trace_once` compiles a fresh copy of the model's ``forward`` with a capture
backend and runs it once.  It never calls ``torch._dynamo.reset()``: that would make
every model compiled in this process recompile, on this rank alone, and a rank that
recompiles alone hangs in the backend's agreement check.
"""

from __future__ import annotations

import types

import torch

__all__ = ["fresh_callable", "trace_once"]


def fresh_callable(model):
    """``model``'s forward with a code object of its own.

    Dynamo keeps its compiled code on the code object (with guards and a recompile
    limit).  Compiling a copy gives the tool a cache of its own, so that it neither
    reuses nor crowds out what the user compiled already.  Hooks registered on the
    top module are not run.
    """
    model = getattr(model, "_orig_mod", model)  # an already-compiled module: trace the model itself
    if isinstance(model, torch.nn.Module):
        fn, bound = type(model).forward, model
    elif isinstance(model, types.MethodType):
        fn, bound = model.__func__, model.__self__
    elif isinstance(model, types.FunctionType):
        fn, bound = model, None
    else:
        return model
    copy_fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy_fn.__kwdefaults__ = fn.__kwdefaults__
    copy_fn.__qualname__ = fn.__qualname__
    return types.MethodType(copy_fn, bound) if bound is not None else copy_fn


def _own_frame(fn):
    """``fn`` called from a frame of its own: a function of this file, with a code object of its own.

    Dynamo does not trace a torch function (``nn.Conv2d.forward``, ``nn.Sequential.forward``) as
    the top frame: it wraps it in ``torch._dynamo.external_utils.wrap_inline``, whose one ``inner``
    code object every such call shares, and with it one recompile limit (8).  After eight tools'
    traces of torch's own modules, Dynamo would run the next one eagerly, and the tool would see no
    graph at all.  This frame is not torch's, so Dynamo traces it, and it is new each time."""

    def call(*args):
        return fn(*args)

    call.__code__ = call.__code__.replace()
    return call


def trace_once(model, args: tuple, backend) -> str | None:
    """Run ``model(*args)`` once under ``torch.compile(backend=backend)``; ``None``, or why torch could not.

    ``backend(gm, example_inputs)`` sees each graph Dynamo captures and returns the
    function to run for it.  The message says what torch raised (the model on the
    local shape, or the backend itself), in one line.
    """
    try:
        torch.compile(_own_frame(fresh_callable(model)), backend=backend, dynamic=False)(*args)
    except Exception as e:  # torch could not run the model on the local shape
        message = str(e).splitlines()[0] if str(e) else ""
        return f"torch could not trace the model on the local input: {type(e).__name__}: {message}"
    return None
