"""Third-party models nobody here wrote, compiled on DomainTensors as a new user would, against one device.

They run where their libraries are installed (``pip install monai diffusers``); the
test extra does not install them, so CI skips this file (its time budget), and every
session that has them runs it.  One spawned group of 4 ranks:

- MONAI ``BasicUNet`` 2-D on 45 rows split ``[10, 3, 12, 20]`` (odd levels, a graph
  break per decoder stage) and 3-D on 32 rows (its bottleneck is 2 rows on 4 ranks);
- MONAI ``UNet`` (strided convs, residual units, PReLU) on 44 rows;
- diffusers ``UNet2DModel`` without attention on 44 rows split ``[10, 3, 12, 19]``;
- diffusers ``UNet2DModel`` with attention blocks on 36 rows split ``[10, 3, 12, 11]``:
  the attention runs over the sharded H*W tokens (the heads kernel or gathered keys);
- on a 2 x 2 mesh (H and W sharded): BasicUNet 2-D, UNet and UNet2DModel without
  attention, exact; with attention refused by name (its tokens merge two sharded dims).

The models run in float64: their convs keep a bias before each InstanceNorm or GroupNorm,
whose true gradient is zero, so in fp32 its computed value is rounding noise on one
device and on four alike, and no tolerance relative to it can judge a difference.
"""

import pytest
import torch
import torch.nn as nn

from tests.harness import check_global_view, run_ranks

monai = pytest.importorskip("monai")
diffusers = pytest.importorskip("diffusers")

WORLD = 4


class Diffusion(nn.Module):
    """``UNet2DModel(x, t).sample`` at fixed timesteps, as one-argument model."""

    def __init__(self, attention: bool):
        super().__init__()
        from diffusers import UNet2DModel

        blocks = dict(
            down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
            up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        )
        self.unet = UNet2DModel(
            in_channels=2,
            out_channels=2,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            layers_per_block=1,
            add_attention=attention,
            **blocks,
        )

    def forward(self, x):
        return self.unet(x, torch.tensor([10, 500])).sample


def _monai_unet():
    """MONAI's UNet: strided convs, residual units, PReLU."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    ).double()


def _monai_basicunet_2d():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).double()


def _run(rank, world):
    from monai.networks.nets import BasicUNet

    out = {}
    torch.manual_seed(0)
    f64 = torch.float64
    out["monai_basicunet_2d"] = check_global_view(
        _monai_basicunet_2d(),
        torch.randn(2, 1, 45, 32, dtype=f64),
        lengths=(10, 3, 12, 20),
        fullgraph=False,  # a graph break per decoder stage (torch.jit.isinstance)
    )
    out["monai_basicunet_3d"] = check_global_view(
        BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(2, 2, 4, 4, 8, 2)).double(),
        torch.randn(1, 1, 32, 16, 16, dtype=f64),
        fullgraph=False,
    )
    out["monai_unet"] = check_global_view(
        _monai_unet(),
        torch.randn(2, 1, 44, 32, dtype=f64),
    )
    out["diffusers_unet2d"] = check_global_view(
        Diffusion(False).double(), torch.randn(2, 2, 44, 16, dtype=f64), lengths=(10, 3, 12, 19)
    )
    out["diffusers_attention"] = check_global_view(
        Diffusion(True).double(), torch.randn(2, 2, 36, 16, dtype=f64), lengths=(10, 3, 12, 11)
    )
    out.update(_on_a_mesh())
    return out


def _on_a_mesh() -> dict:
    """The same models on a 2 x 2 mesh, H and W sharded (fxhalo.shard(x, shard_dim=(2, 3), group=mesh));
    diffusers' attention merges H and W into one token dim: the w axis gathers its rows first, the
    tokens are split along the h axis alone (refused before, as two axes on one dim)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("h", "w"))
    f64, out = torch.float64, {}
    torch.manual_seed(0)
    out["mesh_monai_basicunet_2d"] = check_global_view(
        _monai_basicunet_2d(),
        torch.randn(2, 1, 45, 36, dtype=f64),
        shard_dim=(2, 3),
        group=mesh,
        fullgraph=False,
    )
    out["mesh_monai_unet"] = check_global_view(
        _monai_unet(),
        torch.randn(2, 1, 44, 36, dtype=f64),
        shard_dim=(2, 3),
        group=mesh,
    )
    out["mesh_diffusers_unet2d"] = check_global_view(
        Diffusion(False).double(), torch.randn(2, 2, 44, 20, dtype=f64), shard_dim=(2, 3), group=mesh
    )
    out["mesh_diffusers_attention"] = check_global_view(
        Diffusion(True).double(), torch.randn(2, 2, 36, 20, dtype=f64), shard_dim=(2, 3), group=mesh
    )
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_run, WORLD, timeout=600)


@pytest.mark.timeout(630)
@pytest.mark.parametrize(
    "case",
    [
        "monai_basicunet_2d",
        "monai_basicunet_3d",
        "monai_unet",
        "diffusers_unet2d",
        "diffusers_attention",
        "mesh_monai_basicunet_2d",
        "mesh_monai_unet",
        "mesh_diffusers_unet2d",
        "mesh_diffusers_attention",
    ],
)
def test_third_party_model_matches_one_device(results, case):
    for rank, out in enumerate(results):
        bad = {k: err for k, (ok, err) in out[case].items() if not ok}
        assert not bad, f"rank {rank}: {bad}"
