"""The registry, docs/coverage.md and the tests agree: every registered op is documented and tested.

Walks every (op, target) the rules register.  Each op's name (``conv2d`` for
``torch.conv2d`` and ``F.conv2d``, ``add_`` for ``Tensor.add_``, ``iadd`` for
``operator.iadd``) must appear in docs/coverage.md, and in at least one test file.
The elementwise table's spellings are exercised one by one by
tests/passes/test_local_rules.py, so they count as tested there.

``python -m tests.passes.test_coverage`` prints the registry by rule family, the
list at the end of docs/coverage.md.
"""

from __future__ import annotations

import collections
import functools
import operator
import pathlib
import re

import torch
import torch.nn.functional as F

from fxhalo.rules import all_rules
from tests.passes.test_local_rules import ELEMENTWISE_TARGETS

ROOT = pathlib.Path(__file__).resolve().parents[2]
_NAMESPACES = (torch, F, torch._C._nn, torch.special, operator)


@functools.cache
def _names() -> dict[int, str]:
    """id of every public function of the namespaces -> its name there (the first namespace wins)."""
    names: dict[int, str] = {}
    for ns in _NAMESPACES:
        for name in dir(ns):  # sorted: the first spelling wins, as it did when searched one by one
            if not name.startswith("__"):
                names.setdefault(id(getattr(ns, name, None)), name)
    for name in dir(torch.fft):  # written torch.fft.X: named "fft.X"
        if not name.startswith("_"):
            names.setdefault(id(getattr(torch.fft, name)), f"fft.{name}")
    return names


def op_name(op: str, target) -> str:
    """The name a user writes for ``target``: its attribute name in the first namespace that holds it."""
    if op == "call_method":
        return target
    if isinstance(target, torch._ops.OpOverload):  # a custom op: its namespace and name (fxhalo.redistribute)
        return f"{target.namespace}.{target._opname}"
    return _names().get(id(target), target.__name__)


def registry_by_family() -> dict[str, list[str]]:
    """Rule family (the rule's module) -> sorted op names."""
    families = collections.defaultdict(set)
    for (op, target), rule in all_rules().items():
        families[type(rule).__module__.rsplit(".", 1)[-1]].add(op_name(op, target))
    return {family: sorted(names) for family, names in sorted(families.items())}


def _named(name: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def test_every_registered_op_is_in_the_coverage_table():
    doc = (ROOT / "docs" / "coverage.md").read_text()
    missing = {f: [n for n in names if not _named(n, doc)] for f, names in registry_by_family().items()}
    missing = {f: names for f, names in missing.items() if names}
    assert not missing, f"registered but not in docs/coverage.md: {missing}"


def test_every_registered_op_is_named_in_a_test():
    this = pathlib.Path(__file__).resolve()
    text = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.resolve() != this)
    walked = set(ELEMENTWISE_TARGETS)
    missing = sorted(
        {op_name(op, t) for (op, t) in all_rules() if (op, t) not in walked and not _named(op_name(op, t), text)}
    )
    assert not missing, f"registered but named in no test: {missing}"


if __name__ == "__main__":
    for family, names in registry_by_family().items():
        print(f"| `{family}` | " + " ".join(f"`{n}`" for n in names) + " |")
