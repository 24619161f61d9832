"""Every ```python block in README.md and docs/*.md runs as written, as one test item each.

How a block runs:

* A block that calls ``init_process_group("gloo")``, as a script started by torchrun
  does, runs on 2 spawned gloo ranks.  All such blocks share one spawned group
  (``fxhalo.launch.run_ranks``) and run one after another in fresh namespaces; the
  group stands in for the block's own, so ``init_process_group`` and
  ``destroy_process_group`` do nothing there.
* Any other block runs as a script (``__name__ == "__main__"``) in one subprocess,
  one block after another, so a block that spawns its own ranks does so.
* ``<!-- docs-test: skip (reason) -->`` on the line before a block skips it.  Each
  skipped block is a skipped test item with that reason, which ``pytest -ra`` lists.

Blocks check their own claims with ``assert``; a few get an extra check below
(``CHECKS``).  Both runners swap the default inner compiler, Inductor, for
``aot_eager``: the rewrite, the collectives and autograd are the same, and
Inductor's C++ compile would take minutes per block on the 2-core CI machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from fxhalo.launch import run_ranks  # fresh ranks: the blocks patch torch.distributed and fxhalo.backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
LAUNCHED = re.compile(r"""init_process_group\(\s*["']gloo["']\s*\)""")


@dataclasses.dataclass(frozen=True)
class Check:
    """More than a block asserts itself.  ``anchor``: a line the block must contain, so that a
    check fails loudly when blocks move instead of checking the wrong one."""

    anchor: str
    after: str = ""  # code run after the block, in its namespace
    stdout: str | None = None  # text the block must print (script blocks)


#: (page, n-th python block of the page, from 1) -> Check
CHECKS = {
    ("README.md", 1): Check(
        "y = fxhalo.gather(y_global)",
        after="assert torch.allclose(y, model(x), atol=1e-5, rtol=1e-4), 'README != one device'\n",
    ),
    ("docs/eager.md", 1): Check("print(run_ranks(main, 2))", stdout="[True, True]"),
}


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    nth: int  # among the page's python blocks, from 1
    code: str
    skip: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def launched(self) -> bool:
        return LAUNCHED.search(self.code) is not None

    @property
    def source(self) -> str:
        """The code, moved down to its lines in the page, so that tracebacks point into the page."""
        return "\n" * self.line + self.code


def doc_blocks() -> list[Block]:
    out = []
    for path in PAGES:
        lines = path.read_text().splitlines()
        page, nth, i = path.relative_to(ROOT).as_posix(), 0, 0
        while i < len(lines):
            if lines[i].strip() != "```python":
                i += 1
                continue
            start, nth = i, nth + 1
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{page}:{start + 1}: a python block that is never closed"
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.search(before)
            code = textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"
            check = CHECKS.get((page, nth))
            if check is not None:
                assert check.anchor in code, f"{page} python block {nth} lacks {check.anchor!r}; update CHECKS"
                code += check.after
            out.append(Block(page, start + 1, nth, code, marker.group(1) if marker else None))
            i = end + 1
    return out


BLOCKS = doc_blocks()


def _quick_inner_compiler() -> None:
    """Make ``compiler="inductor"`` (the default) compile with aot_eager in this process."""
    import importlib

    module = importlib.import_module("fxhalo.backend")  # the attribute fxhalo.backend is the function
    inner = module._inner
    module._inner = lambda compiler: inner("aot_eager" if compiler == "inductor" else compiler)


def _run_launched(rank, world_size, blocks):
    """On each rank: every launched ``(id, page, source)`` in turn; returns ``{id: traceback or None}``."""
    import traceback

    import torch
    import torch.distributed as dist

    _quick_inner_compiler()
    # The harness's group stands in for the block's own (a launcher's job).
    dist.init_process_group = lambda *args, **kwargs: None
    dist.destroy_process_group = lambda *args, **kwargs: None
    results = {}
    for block_id, page, source in blocks:
        torch._dynamo.reset()  # compile afresh: blocks share code objects such as nn.Sequential.forward
        try:
            exec(compile(source, page, "exec"), {"__name__": "__main__"})
            results[block_id] = None
        except BaseException:  # noqa: BLE001 - reported per block
            results[block_id] = traceback.format_exc()
    return results


def run_scripts(spec_path: str) -> None:
    """In a subprocess: run each ``(id, file)`` of the spec as ``__main__``; write ``{id: result}``."""
    import contextlib
    import io
    import runpy
    import traceback

    import torch

    _quick_inner_compiler()
    spec = json.loads(pathlib.Path(spec_path).read_text())
    results = {}
    for block_id, path in spec["blocks"]:
        torch._dynamo.reset()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(path, run_name="__main__")  # spawned children re-import the block's file
            error = None
        except BaseException:  # noqa: BLE001 - reported per block
            error = traceback.format_exc()
        results[block_id] = {"error": error, "stdout": out.getvalue()}
    pathlib.Path(spec["out"]).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def doc_results(tmp_path_factory):
    """Run every block that is not skipped, once: ``{id: {"error": ..., "stdout": ...}}``."""
    tmp = tmp_path_factory.mktemp("docs")
    todo = [b for b in BLOCKS if b.skip is None]
    scripts = []
    for b in todo:
        if not b.launched:
            path = tmp / (re.sub(r"\W", "_", b.id) + ".py")
            path.write_text(b.source)
            scripts.append((b.id, str(path)))
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"blocks": scripts, "out": str(tmp / "out.json")}))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    # The scripts run in a subprocess while this process spawns the ranks for the launched blocks.
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_docs import run_scripts; run_scripts({str(spec)!r})"],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    results = {}
    try:
        launched = [(b.id, b.page, b.source) for b in todo if b.launched]
        if launched:
            per_rank = run_ranks(_run_launched, 2, launched, timeout=400)
            for block_id, _, _ in launched:
                errors = [f"--- rank {r} ---\n{res[block_id]}" for r, res in enumerate(per_rank) if res[block_id]]
                results[block_id] = {"error": "\n".join(errors) or None, "stdout": ""}
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"the script runner failed:\n{log[-5000:]}"
    results.update(json.loads((tmp / "out.json").read_text()))
    return results


@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block, request):
    if block.skip is not None:
        pytest.skip(f"marked in {block.page}: {block.skip}")
    result = request.getfixturevalue("doc_results")[block.id]
    assert result["error"] is None, f"{block.id} ({'2 ranks' if block.launched else 'script'}):\n{result['error']}"
    want = CHECKS.get((block.page, block.nth), Check("")).stdout
    if want is not None:
        assert want in result["stdout"], f"{block.id} printed {result['stdout']!r}, expected {want!r}"


def test_every_page_is_in_the_index_and_the_nav():
    """docs/index.md links every page, and mkdocs.yml lists every page in its nav."""
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    index = (ROOT / "docs" / "index.md").read_text()
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p for p in pages if p != "index.md" and f"]({p})" not in index]
    assert missing == [], f"link these pages from docs/index.md: {missing}"
    missing = [p for p in pages if not re.search(rf":\s*{re.escape(p)}\s*$", nav, re.M)]
    assert missing == [], f"add these pages to the nav in mkdocs.yml: {missing}"


def test_readme_first_command_runs_the_demo():
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert first.strip().endswith("python -m fxhalo.demo")
