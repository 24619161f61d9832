"""With one rank the backend hands the graph to the inner compiler unchanged."""

import pytest
import torch

from tests.harness import run_ranks


def _one_rank(rank, world_size):
    import fxhalo

    before, after = [], []

    def recording(gm, example_inputs):
        after.append(gm.code)
        return gm.forward

    def capture(gm, example_inputs):
        before.append(gm.code)
        return gm.forward

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), torch.nn.ReLU())
    x = torch.randn(1, 1, 6, 6)
    torch.compile(m, backend=capture)(x)
    torch._dynamo.reset()
    y = torch.compile(m, backend=fxhalo.backend(compiler=recording))(x)
    return before == after, torch.allclose(y, m(x))


@pytest.mark.timeout(120)
def test_world_size_one_leaves_the_graph_untouched():
    assert run_ranks(_one_rank, 1, timeout=100) == [(True, True)]
