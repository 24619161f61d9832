"""``fxhalo.validate``: find every problem before launching a job.

It traces the
model with Dynamo on one rank's example input, runs sharding propagation for a
simulated domain (any ``world_size`` and ``rank``, no process group or collective
needed) and collects, instead of raising:

* ops that would be refused (no rule, or not local along the sharded dim);
* local sizes that strides or windows do not divide at some depth;
* halos wider than a shard (handled, by fetching from further ranks, but each
  extra hop costs traffic);
* errors torch itself raises when the model runs on the local shape.

Nothing is rewritten or run across ranks; the model runs once, locally and
unchanged, on the example input.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist

from .domain import Domain, resolve_group
from .errors import FxHaloError, describe_node, user_source
from .mesh import MeshDomain, mesh_domain, on_several_axes, simulated_rank
from .passes import PassContext
from .passes.pipeline import run_pipeline
from .rules import OnAxes, decision_of
from .rules.conv import ConvRule
from .tensor import DomainTensor, as_meta, input_mesh, meta_domain_tensor
from .tracing import trace_once

__all__ = ["Problem", "validate"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing that would stop, or slow, the domain-parallel model."""

    kind: str  # "refused", "wide halo" or "trace"
    op: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def validate(
    model,
    example_local_input,
    *,
    world_size: int | None = None,
    rank: int | None = None,
    group=None,
    shard_dim: int = 2,
    input_shard_dims=None,
    fallback=None,
    global_view: bool = False,
    partition=None,
) -> list[Problem]:
    """Problems of ``model`` on ``world_size`` ranks given one rank's input (empty when all is well).

    ``example_local_input`` is a tensor or a tuple of forward arguments.  Inside an
    initialised process group ``world_size`` and ``rank`` default to the real ones.

    It runs the backend's pipeline (:func:`fxhalo.passes.pipeline.run_pipeline`) as
    :func:`fxhalo.explain` does, collecting every refusal, up to the sharding
    propagation: everything it reports is decided there, and the later passes would
    need a process group of the simulated size.  Like explain, it traces a fresh copy
    of the model's code and never resets Dynamo (a rank that recompiles alone hangs
    the backend's agreement check).

    With ``global_view=True`` the example input is the *global* one (a meta tensor
    will do), checked as the backend would compile the model on DomainTensors split as
    ``partition`` (every rank's length; default balanced).  DomainTensor inputs are
    checked that way too, on the meta device; DomainTensors split over a mesh (inside the
    job that made them) are checked on that mesh, for this rank.
    """
    mesh = input_mesh(_as_args(example_local_input))
    if mesh is not None:  # DomainTensors split over a mesh, inside the job that made them: that mesh, this rank
        shard_dim, world_size, rank = mesh.whole.shard_dim, mesh.whole.size, mesh.whole.rank
    elif on_several_axes(shard_dim, group):
        if global_view or any(isinstance(x, DomainTensor) for x in _as_args(example_local_input)):
            raise FxHaloError(
                "fxhalo.validate(global_view=True) on a mesh of several axes from a global tensor is not supported "
                "yet. Remedy: pass the DomainTensors themselves (fxhalo.shard(x, shard_dim=(2, 3), group=mesh)) "
                "inside the job, or validate one rank's local block (global_view=False)"
            )
        mesh = _mesh(group, tuple(shard_dim), world_size, rank)
        shard_dim, world_size, rank = mesh.whole.shard_dim, mesh.whole.size, mesh.whole.rank
    elif isinstance(shard_dim, tuple):
        (shard_dim,) = shard_dim
    if world_size is None:
        if group is None and not dist.is_initialized():
            raise FxHaloError("fxhalo.validate needs world_size=... when no process group is initialised")
        pg = resolve_group(group)
        world_size, rank = dist.get_world_size(pg), dist.get_rank(pg) if rank is None else rank
    args = _as_args(example_local_input)
    given = [x for x in args if isinstance(x, DomainTensor)]  # DomainTensors: checked, never run
    group_name = given[0].spec.group_name if given else "fxhalo-validate"
    domain = mesh.whole if mesh is not None else Domain(group_name, 0 if rank is None else rank, world_size, shard_dim)
    global_view = global_view or bool(given)
    if global_view:
        args = tuple(as_meta(meta_domain_tensor(x, domain, partition)) for x in args)
    problems: list[Problem] = []

    def capture(gm, example_inputs):
        # keeps running the unrewritten code (a copy: the global view's pass edits the graph)
        original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph) if global_view else gm.graph)
        ctx = PassContext(domain, dict(input_shard_dims or {}), fallback, global_view=global_view, mesh=mesh)
        example_inputs = [getattr(x, "_local", x) for x in example_inputs]
        refused: list = []
        run_pipeline(gm, example_inputs, ctx, problems=refused, stop_after="propagate_sharding")
        for node, err in refused:
            problems.append(Problem("refused", describe_node(node), user_source(node), str(err)))
        problems.extend(_wide_halos(gm))
        return original

    with torch.no_grad():
        failure = trace_once(model, args, capture)
    if failure is not None:
        problems.append(Problem("trace", type(model).__name__, "", failure))
    return problems


def _as_args(example_local_input) -> tuple:
    return example_local_input if isinstance(example_local_input, tuple) else (example_local_input,)


def _mesh(group, shard_dims: tuple[int, ...], world_size, rank) -> MeshDomain:
    """The mesh to validate on: ``group``'s (a ``DeviceMesh``, inside a process group), or one of shape
    ``world_size`` simulated without any (``rank``: the flat rank, row-major as a ``DeviceMesh`` numbers
    them)."""
    if group is not None or dist.is_initialized():
        return mesh_domain(group, shard_dims)
    rank = simulated_rank(world_size, shard_dims, rank, "fxhalo.validate")
    coords, rest = [], rank
    for n in reversed(world_size):
        coords.append(rest % n)
        rest //= n
    axes = tuple(
        Domain(f"fxhalo-validate-dim{d}", c, n, d) for d, c, n in zip(shard_dims, reversed(coords), world_size)
    )
    whole = Domain("fxhalo-validate", rank, math.prod(world_size), shard_dims[0])
    return MeshDomain(axes, whole, tuple(f"dim{d}" for d in shard_dims))


def _wide_halos(gm: torch.fx.GraphModule) -> list[Problem]:
    """Halos wider than a shard, from the conv rule's decisions (on a mesh, each axis's)."""
    found = []
    for node in gm.graph.nodes:
        decision = decision_of(node)
        if decision is None or not isinstance(decision.rule, ConvRule) or not decision.rewrites:
            continue
        if isinstance(decision.layout, OnAxes):
            windows = [
                (f" along dim {s.dim}", plan) for (_, s), plan in zip(decision.layout.entries, decision.layout.plans)
            ]
        else:
            windows = [("", decision.plan)]
        for along, window in windows:
            if window.reach > window.shard:
                found.append(
                    Problem(
                        "wide halo",
                        describe_node(node),
                        user_source(node),
                        f"{describe_node(node)} needs a halo of {window.reach} rows{along}, wider than the "
                        f"{window.shard}-row shards: the rows come from ranks beyond the neighbour (supported, "
                        "but each extra hop adds traffic). Use fewer ranks or a larger input to avoid it.",
                    )
                )
    return found
