"""Import stand-ins for the packages CREDIT imports but its CrossFormer and FuXi never call.

``credit.models`` imports ``torchvision`` (through ``credit.transforms`` and timm) and
``segmentation_models_pytorch`` (through ``credit.skebs``).  The only torchvision wheel
the package index serves for torch 2.13 is a CUDA build that does not load under the
CPU torch, and ``segmentation_models_pytorch`` pulls in more of the same.  The models
under test use neither, so :func:`install` puts a finder on ``sys.meta_path`` that
answers any import of those two packages (and their submodules) with an empty module:
every attribute is a class that raises ``ImportError`` when called, and every class
attribute of that class is a name (timm builds a table keyed by
``InterpolationMode.NEAREST`` at import).  A model that did call into them would fail
loudly, not silently.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

#: the packages stood in for
STOOD_IN = ("torchvision", "segmentation_models_pytorch")


class _AnyMember(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _Absent(metaclass=_AnyMember):
    def __init__(self, *args, **kwargs):
        raise ImportError(f"{type(self).__name__} comes from a package stood in by tests/credit_standin.py")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Absent,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = frozenset(roots)

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    """Answer imports of the packages of :data:`STOOD_IN` that do not import for real with stand-ins."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    missing = []
    for name in STOOD_IN:
        try:
            __import__(name)
        except Exception:  # absent, or (torchvision's CUDA wheel) present but not loadable
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            missing.append(name)
    if missing:
        sys.meta_path.insert(0, _Finder(missing))
