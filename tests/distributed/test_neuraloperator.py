"""neuraloperator's FNO, a model nobody here wrote, compiled on DomainTensors as a new user would.

``.ci/run`` installs ``neuraloperator`` without its training stack (``--no-deps``, plus
``tensorly``, ``tensorly-torch`` and ``opt-einsum``); elsewhere the file is skipped
when it does not import.  One spawn of 4 ranks: a 2-layer 2-D FNO on 33 rows (balanced,
uneven) and on 30 rows split ``[10, 3, 12, 5]``, and on a 2 x 2 mesh (H and W split),
forward, input and weight gradients against one device.  It builds its positional grid from ``x.shape``, takes ``rfftn``
over H and W (the shard moves to the frequency dim of W), ``fftshift``s H, writes
the low modes into a zero buffer and transforms back.

One user step is needed: neuraloperator makes tensorly contract through
``opt_einsum``, whose backend lookup (``importlib.import_module``) Dynamo refuses to
trace; ``tensorly.plugins.use_default_einsum()`` makes it call ``torch.einsum``.
"""

import os

import pytest
import torch

from tests.harness import check_global_view, run_ranks

# CI installs it (.ci/run): there a failed import must fail, not skip the test unseen.
neuralop = pytest.importorskip("neuralop") if not os.environ.get("CI") else __import__("neuralop")

WORLD = 4


def _run(rank, world):
    import tensorly
    from neuralop.models import FNO

    tensorly.plugins.use_default_einsum()  # opt_einsum's backend lookup is not traceable (see above)
    torch.manual_seed(0)
    out = {}
    fno = dict(hidden_channels=8, in_channels=2, out_channels=1, n_layers=2)
    out["fno2d, 33 rows"] = check_global_view(FNO(n_modes=(8, 8), **fno), torch.randn(1, 2, 33, 32))
    out["fno2d, [10, 3, 12, 5]"] = check_global_view(
        FNO(n_modes=(6, 6), **fno), torch.randn(2, 2, 30, 16), lengths=[10, 3, 12, 5]
    )
    # On a 2 x 2 mesh, H and W split: the transforms take the pencil (three moves each), the modes are
    # sliced and written per axis, and ChannelMLP's flatten of H and W into one dim gathers W's rows
    # first (the w axis), then the w axis slices them again where the reshape back restores W.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("h", "w"))
    out["fno2d on a 2 x 2 mesh, 33 x 30"] = check_global_view(
        FNO(n_modes=(8, 8), **fno), torch.randn(1, 2, 33, 30), shard_dim=(2, 3), group=mesh
    )
    return {name: {k: ok for k, (ok, _) in checks.items()} for name, checks in out.items()}


@pytest.mark.timeout(300)
def test_fno_matches_one_device():
    failures = [
        (rank, name, checks)
        for rank, per_rank in enumerate(run_ranks(_run, WORLD, timeout=280))
        for name, checks in per_rank.items()
        if not all(checks.values())
    ]
    assert not failures, failures
