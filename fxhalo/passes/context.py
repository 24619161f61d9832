"""What every pass and rule gets to see: the domain, the options, and how to refuse."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..domain import Domain
from ..errors import FxHaloError, describe_node
from ..layout import example_value
from ..mesh import MeshDomain


@dataclasses.dataclass
class PassContext:
    domain: Domain
    #: per forward-argument override of the input rule: name -> sharded dim, or None for replicated
    input_shard_dims: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    #: None (refuse ops without a rule) or "gather"
    fallback: str | None = None
    #: layouts already known for some placeholders (values produced by an earlier graph)
    known_inputs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    #: global length of each sharded placeholder along its sharded dim (gathered from the ranks at
    #: compile time); a placeholder missing here is taken to be evenly sharded (one-process tools)
    input_lengths: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: wrap the parameters so that their gradients are summed over the domain group
    grad_sync: bool = True
    #: send a norm's statistics with the next conv's halo rows (fxhalo.passes.fuse)
    fuse_exchanges: bool = True
    #: ... a max pool's rows too (fxhalo.backend.fuses_max_pools: not under an Inductor whose C++ may be
    #: compiled with GCC's loop splitting, which got such a backward wrong)
    fuse_max_pools: bool = True
    #: the graph was traced at global shapes on DomainTensor inputs (fxhalo.passes.localize)
    global_view: bool = False
    #: the domain axes, when there are several (``domain`` is then the whole domain: every rank of them);
    #: ``input_lengths`` then holds one global length per axis for each placeholder
    mesh: MeshDomain | None = None

    @property
    def on_mesh(self) -> bool:
        """Several domain axes: rules are asked once per axis (:mod:`fxhalo.passes.propagate`)."""
        return self.mesh is not None and len(self.mesh.axes) > 1

    @property
    def n_axes(self) -> int:
        """The domain's mesh axes: every layout has one entry per axis."""
        return len(self.mesh.axes) if self.on_mesh else 1

    def along_each_axis(self) -> list[PassContext]:
        """:meth:`along` for every mesh axis, in order."""
        return [self.along(axis) for axis in range(len(self.mesh.axes))]

    def along(self, axis: int) -> PassContext:
        """The context a rule sees when it decides along mesh ``axis`` alone: that axis's domain, its
        input lengths and its entries of the per-input overrides."""
        return dataclasses.replace(
            self,
            domain=self.mesh.axes[axis],
            mesh=None,
            input_shard_dims={k: None if v is None else v[axis] for k, v in self.input_shard_dims.items()},
            input_lengths={k: v[axis] for k, v in self.input_lengths.items()},
        )

    def refuse(self, node, problem: str, remedy: str):
        """Raise the :class:`FxHaloError` for a node fxhalo cannot handle."""
        val = example_value(node.all_input_nodes[0]) if node.all_input_nodes else None
        shape = f" Input local shape: {tuple(val.shape)}." if hasattr(val, "shape") else ""
        raise FxHaloError(
            f"fxhalo cannot make {describe_node(node)} domain-parallel: it {problem}.{shape} Remedy: {remedy}."
        )
