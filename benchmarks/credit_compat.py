"""Import CREDIT's domain-parallel layers (``pip install --no-deps miles-credit``) without its stack.

``credit.domain_parallel`` itself needs only torch, except for one import:
``credit.domain_parallel.convert`` does
``from credit.models.wxformer.crossformer import CrossEmbedConvBranch``, only to
test ``isinstance(module, CrossEmbedConvBranch)``.  The real module pulls in
``credit.models`` (einops, CREDIT's post-blocks, boundary padding, attention
modules, ...), whose dependencies (xarray, cartopy, torch-harmonics, torch_geometric,
...) a ``--no-deps`` install does not have.

**What is stubbed, exactly:** if ``credit.models.wxformer.crossformer`` is not
already imported, a module of that name holding one class,
``CrossEmbedConvBranch(nn.Sequential)``, is put in ``sys.modules``.  No model
here is an instance of it, so CREDIT's converter takes the same branches it
would with the real class.  Nothing else is stubbed or patched; the parent
packages ``credit.models`` and ``credit.models.wxformer`` are never imported
(Python finds the leaf in ``sys.modules`` first).

Verified against miles-credit 2026.2.0 (the ``credit.domain_parallel`` modules:
``manager``, ``halo_exchange``, ``layers``, ``convert``, ``sharding``).
"""

from __future__ import annotations

import importlib.metadata
import sys
import types

import torch.nn as nn

__all__ = ["STUBBED", "import_credit", "credit_version"]

STUBBED = ("credit.models.wxformer.crossformer.CrossEmbedConvBranch",)


def _stub_crossformer() -> None:
    name = "credit.models.wxformer.crossformer"
    if name in sys.modules:
        return
    mod = types.ModuleType(name, "benchmarks.credit_compat stub: only CrossEmbedConvBranch, for an isinstance test")

    class CrossEmbedConvBranch(nn.Sequential):
        """Stand-in for CREDIT's CrossEmbedLayer branch (nn.Sequential(ZeroPad2d, Conv2d))."""

    CrossEmbedConvBranch.__module__ = name
    mod.CrossEmbedConvBranch = CrossEmbedConvBranch
    sys.modules[name] = mod


def credit_version() -> str | None:
    try:
        return importlib.metadata.version("miles-credit")
    except importlib.metadata.PackageNotFoundError:
        return None


def import_credit():
    """``credit.domain_parallel``, or raise ``ImportError`` saying why it is unavailable."""
    if credit_version() is None:
        raise ImportError("miles-credit is not installed (pip install --no-deps miles-credit)")
    _stub_crossformer()
    import credit.domain_parallel as dp

    return dp
