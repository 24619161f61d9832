"""Run a model on PhysicsNeMo's ``ShardTensor`` (``nvidia-physicsnemo``), on CPU, for the benchmark's
``shardtensor`` row.

Facts this relies on (``../shared/anchors/shardtensor.md``, checked against nvidia-physicsnemo 2.2.2):

* Its package ``__init__`` registers the per-op patches only when CUDA is available; on CPU they are
  registered here by importing its patch modules one by one (``physicsnemo.domain_parallel.custom_ops``
  and every ``shard_utils`` submodule).  A submodule that fails to import (one chain imports
  torchvision) is skipped and named in the row's note.
* Inputs are made with ``ShardTensor.from_local(x, mesh, [Shard(dim)], sharding_shapes="chunk")``: the
  default ``"infer"`` moves a pinned tensor to CUDA.
* Models stay plain modules; weight gradients arrive already summed over the ranks.

Install it in a virtual environment of its own (``--no-deps``, as the anchor lists); nothing in the
suite imports this module.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["import_shardtensor", "register_patches", "wrap"]

_SKIPPED: list[str] = []


def import_shardtensor():
    """``(ShardTensor, Shard)``, or raise ``ImportError``."""
    from physicsnemo.domain_parallel import ShardTensor
    from torch.distributed.tensor.placement_types import Shard

    return ShardTensor, Shard


def register_patches() -> list[str]:
    """Import every patch module of ``physicsnemo.domain_parallel`` (what its ``__init__`` does on CUDA
    only); returns the ones that would not import."""
    if _SKIPPED:
        return _SKIPPED
    import physicsnemo.domain_parallel as dp

    for info in pkgutil.walk_packages(dp.__path__, dp.__name__ + "."):
        if ".custom_ops" in info.name or ".shard_utils" in info.name:
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001 - a patch chain that needs torchvision
                _SKIPPED.append(f"{info.name} ({type(e).__name__})")
    _SKIPPED.append("")  # registered once: the list is not empty any more
    return [s for s in _SKIPPED if s]


def wrap(model, shard_dim: int, global_shape, ranks: int):
    """A function of the local slab: the slab as a ShardTensor over a 1-D CPU mesh of ``ranks``, through
    ``model``, back as this rank's rows (a plain tensor, for the step's loss)."""
    from torch.distributed.device_mesh import init_device_mesh

    ShardTensor, Shard = import_shardtensor()
    register_patches()
    mesh = init_device_mesh("cpu", (ranks,))

    def run(x_local):
        x = ShardTensor.from_local(
            x_local, mesh, [Shard(shard_dim)], sharding_shapes="chunk", global_shape=tuple(global_shape)
        )
        return model(x).to_local()

    return run
