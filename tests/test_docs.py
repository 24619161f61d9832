"""The README's example runs as written, on 2 ranks, and gives one device's answer."""

import pathlib
import re

import pytest

from tests.harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_example() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def _run_example(rank, world_size, code):
    import torch

    # The harness has already initialised the group the example would create.
    code = code.replace('dist.init_process_group("gloo")', "pass")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    ns["model"].zero_grad()
    return torch.allclose(ns["y"], ns["model"](ns["x"]), atol=1e-5, rtol=1e-4)


@pytest.mark.timeout(300)
def test_readme_example_matches_one_device():
    code = readme_example()
    assert 'backend="domain_parallel"' in code
    code = code.replace("options={\"shard_dim\": 2}", "options={\"shard_dim\": 2, \"compiler\": \"aot_eager\"}")
    assert run_ranks(_run_example, 2, code, timeout=240) == [True, True]
