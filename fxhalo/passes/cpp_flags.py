"""The C++ compiler flag fxhalo asks of Inductor: ``-fno-split-loops`` with GCC.

**Why.** GCC's loop splitting (``-fsplit-loops``, part of the ``-O3`` that Inductor compiles its C++
kernels with) miscompiled a kernel that Inductor's C++ backend generated for a halo graph. The kernel was
a 2-D tile: 16 positions along W, and a tail of 4 channels vectorised with masked loads
(``cpp.enable_loop_tail_vec``). Its value depended on the row: ``row >= k ? received : local``. That
select is what the backward of a halo's ``cat`` makes. The first position of each tile got the tile's
last position's value: order-1 wrong gradients on the halo's rows. It was found in SkipUNet's pattern
(a norm and SiLU read by a max pool and a conv, 45 rows on 2 ranks). The same kernel, compiled on its
own with GCC 12.2 (Debian 12.2.0-14), is wrong at ``-O3`` and right at ``-O2`` or with
``-fno-split-loops``. Through Inductor, the model is exact with the flag and wrong without it.
(``docs/compiled.md``, "The C++ compiler", has the reduction.)

**How.** Inductor has no setting for extra compiler flags. It builds its command line as one string, with
``cpp.march`` in it as ``-march=<value>``, and splits that string with :func:`shlex.split`. So the backend
patches ``cpp.march = "native -fno-split-loops"`` for fxhalo's rewritten graphs only (with one rank the
graph goes to Inductor untouched). :func:`split_loops_off` first checks that the command line Inductor
would build carries ``-fno-split-loops`` as an argument of its own. The patch applies only where it means
what it says: GCC, Linux on x86-64, and ``cpp.march`` unset (Inductor's own default there is
``-march=native``) or set by the user (the flag is appended). Elsewhere it gives no patch, and then no
norm fuses with a max pool (:func:`fxhalo.backend.fuses_max_pools`), the pattern that was miscompiled.
"""

from __future__ import annotations

import functools
import platform
import shlex
import sys

__all__ = ["split_loops_off"]

_FLAG = "-fno-split-loops"


def split_loops_off() -> dict:
    """Inductor ``config_patches`` that compile C++ kernels with ``-fno-split-loops``, or ``{}`` where
    that does not apply (see the module's docstring)."""
    from torch._inductor import config

    march = config.cpp.march
    if march == "":  # the user asked for no architecture flag at all
        return {}
    value = f"{march or 'native'} {_FLAG}"
    return {"cpp.march": value} if _carried(value) else {}


@functools.cache
def _carried(march: str) -> bool:
    """Does Inductor's command line, built with ``cpp.march = march``, carry the flag as an argument?"""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    from torch._inductor import config
    from torch._inductor.cpp_builder import CppBuilder, CppOptions, _is_gcc, get_cpp_compiler

    try:
        if not _is_gcc(get_cpp_compiler()):
            return False
        with config.patch({"cpp.march": march}):
            line = CppBuilder("fxhalo_flags", ["fxhalo_flags.cpp"], CppOptions(), "/tmp").get_command_line()
    except Exception:  # no compiler, or an Inductor that builds its command otherwise: leave it alone
        return False
    return _FLAG in shlex.split(line)
