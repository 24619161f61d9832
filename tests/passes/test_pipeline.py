"""One pipeline, three viewers: the pass list, the import graph, the halo observers, explain's refusal path."""

import ast
import pathlib

import torch
import torch.nn as nn

import fxhalo
from fxhalo.halo import Edge, observe_halos, plan_halo, send_buffer
from fxhalo.passes.pipeline import PASSES

PACKAGE = pathlib.Path(fxhalo.__file__).resolve().parent


def test_the_passes_in_order():
    assert [name for name, _ in PASSES] == [
        "propagate_sharding",
        "rewrite",
        "fold_pads",
        "fuse_norm_exchanges",
        "wrap_replicated_boundaries",
        "refresh_meta",
    ]


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (f, package)
    graph = {}
    for name, (f, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            # A module importing its own package (``import fxhalo``) is not an edge of a cycle.
            deps.update(t for t in targets if t in modules and t != name and not name.startswith(t + "."))
        graph[name] = deps
    return graph


def test_no_module_imports_explain_and_no_cycles():
    graph = _import_graph()
    assert [m for m, deps in graph.items() if "fxhalo.explain" in deps] == ["fxhalo"]  # the re-export only
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_no_module_is_over_500_lines_among_the_split_ones():
    for name in ("explain.py", "report.py", "measure.py", "log.py", "tracing.py", "validate.py", "passes/pipeline.py"):
        assert len((PACKAGE / name).read_text().splitlines()) <= 500, name


def test_halo_observers_hear_each_exchange_and_only_inside_the_block():
    partition = ((0, 4), (4, 8))
    plan = plan_halo(partition, ((-1, 5), (3, 9)), 0, Edge())
    heard = []
    x = torch.arange(4.0).view(4, 1)
    with observe_halos(lambda p, e: heard.append((p, e))):
        send_buffer(x, 0, plan, "clamp")
    send_buffer(x, 0, plan, "clamp")
    assert heard == [(plan, "clamp")]


class _FusedAndRefused(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.sort(self.c2(torch.nn.functional.gelu(self.norm(self.c1(x)))), dim=2).values


def test_explain_fuses_norm_exchanges_when_something_is_refused_too():
    ex = fxhalo.explain(_FusedAndRefused(), torch.randn(1, 1, 8, 16), world_size=4, rank=1)
    assert [r.op for r in ex.problems] == ["torch.sort"]
    assert "ops.norm.group_norm_exchange" in [r.kernel for r in ex.rows]  # as the backend would compile it
