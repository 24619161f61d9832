"""fxhalo: domain parallelism for PyTorch models through ``torch.compile``.

::

    import fxhalo
    model = torch.compile(model, backend="domain_parallel")
    y = model(fxhalo.shard(x, shard_dim=2))  # a DomainTensor in, a DomainTensor of model(x) out
"""

from . import nn  # noqa: F401  (fxhalo.nn; not in __all__, where a star import would shadow torch.nn)
from .backend import backend
from .backend import register as _register_backend
from .construct import from_dtensor, from_local, shard
from .convert import convert_to_domain_parallel, validate_sharding_constraints
from .depthwise import DistributedDepthwiseConv1d, DistributedDepthwiseConv2d
from .domain import Domain
from .errors import FxHaloError
from .explain import Explanation, explain
from .halo import Edge, halo_exchange, plan_halo
from .redistribute import channels_to_seq, redistribute, seq_to_channels
from .tensor import DomainSpec, DomainTensor, MeshSpec, gather
from .validate import Problem, validate

__version__ = "0.1.0"

__all__ = [
    "FxHaloError",
    "Domain",
    "Edge",
    "Explanation",
    "Problem",
    "backend",
    "explain",
    "gather",
    "halo_exchange",
    "plan_halo",
    "shard",
    "validate",
    "__version__",
    "convert_to_domain_parallel",
    "validate_sharding_constraints",
    "DistributedDepthwiseConv1d",
    "DistributedDepthwiseConv2d",
    "redistribute",
    "seq_to_channels",
    "channels_to_seq",
    "DomainTensor",
    "DomainSpec",
    "MeshSpec",
    "from_local",
    "from_dtensor",
]

_register_backend()
