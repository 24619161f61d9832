"""The backend is found by name: after `import fxhalo`, and through the entry point without it."""

import subprocess
import sys

import pytest
import torch


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True).stdout


@pytest.mark.timeout(300)
def test_entry_point_finds_the_backend_without_import():
    out = _python(
        "import sys, torch\n"
        "f = torch.compile(lambda x: torch.relu(x) + 1, backend='domain_parallel', options={'compiler': 'eager'})\n"
        "print(f(torch.tensor([-1.0, 2.0])).tolist(), 'fxhalo' in sys.modules)\n"
    )
    assert out.strip() == "[1.0, 3.0] True"


@pytest.mark.timeout(300)
def test_import_then_lookup_and_lookup_then_import_both_work():
    _python(
        "import fxhalo, torch._dynamo as d; from torch._dynamo.backends.registry import lookup_backend; "
        "lookup_backend('domain_parallel'); assert 'domain_parallel' in d.list_backends()"
    )
    _python(
        "from torch._dynamo.backends.registry import lookup_backend, list_backends; list_backends(); "
        "import fxhalo; lookup_backend('domain_parallel')"
    )


@pytest.mark.timeout(120)
def test_without_a_process_group_the_graph_is_untouched():
    import fxhalo

    seen = []

    def recording(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes])
        return gm.forward

    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    f = torch.compile(conv, backend=fxhalo.backend(compiler=recording))
    x = torch.randn(1, 1, 6, 6)
    torch.testing.assert_close(f(x), conv(x))
    assert torch.conv2d in seen[0]
