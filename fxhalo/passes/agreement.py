"""Ranks agree on the rewrite before any collective runs.

Two small ``all_gather_object`` calls over the domain group, at compile time:

1. :func:`gather_input_lengths`, before propagation: every rank's local length of
   each sharded graph input.  Their sum is the global length every rule plans
   with; the lengths must follow the partition rule.
2. :func:`check_agreement`, after the rewrite: each rank's summary of what it
   compiled (the inputs' global layouts, and the sequence of inserted kernels
   with their settings and input shapes, the sharded dim written as its global
   length) or the error it hit.

Either all ranks go on with the same collectives, or all raise the same
:class:`FxHaloError`.  No rank is left waiting inside a collective that the
others never call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..domain import Domain, ShardAxis, check_partition
from ..errors import FxHaloError
from ..layout import Layout, Sharded, example_value, layout_of
from ..mesh import MeshDomain
from .fuse import HALO_ROWS


def _shape(arg) -> str:
    """The node's shape with its sharded dim written as the global length (the same on every rank)."""
    val = example_value(arg) if hasattr(arg, "meta") else None
    if not isinstance(val, torch.Tensor):
        return type(val).__name__
    # A symbolic size (Dynamo's automatic dynamic shapes, after a recompile) is named in the order
    # each rank's tracing met it, so its name differs between ranks that compiled the same thing.
    shape = ["sym" if isinstance(d, torch.SymInt) else str(d) for d in val.shape]
    layout = layout_of(arg)
    for s in layout.axes if isinstance(layout, Layout) else ():
        if isinstance(s, Sharded):
            shape[s.dim] = f"{s.global_length}g"
    halo_dim = arg.meta.get(HALO_ROWS)
    if halo_dim is not None:  # received halo rows: edge ranks get fewer
        shape[halo_dim] = "halo"
    return f"({', '.join(shape)})"


def _everyone(domain: Domain, mine: dict) -> list[dict]:
    everyone: list = [None] * domain.size
    dist.all_gather_object(everyone, mine, group=domain.process_group)
    return everyone


def _raise_first_error(everyone: list[dict], error: BaseException | None) -> None:
    """This rank's own error if it has one, else the first other rank's, on every rank."""
    if isinstance(error, FxHaloError):
        raise error
    if error is not None:
        raise FxHaloError(f"fxhalo could not compile this graph: {type(error).__name__}: {error}") from error
    for r, theirs in enumerate(everyone):
        if theirs["error"] is not None:
            raise FxHaloError(f"rank {r} could not compile this graph, so no rank will run it: {theirs['error']}")


def _error_text(error: BaseException | None) -> str | None:
    return f"{type(error).__name__}: {error}" if error is not None else None


def _sharded_inputs(domain: Domain, mine: dict, error: BaseException | None) -> tuple[list[dict], list[str]]:
    """Every rank's ``mine`` (one all_gather_object), and the names of the sharded inputs, which every
    rank must shard alike; raises the same error on every rank otherwise, or if a rank failed."""
    everyone = _everyone(domain, mine)
    _raise_first_error(everyone, error)
    names = [sorted(e["lengths"]) for e in everyone]
    if any(n != names[0] for n in names):
        raise FxHaloError(
            f"ranks shard different graph inputs ({names}), which would hang the job; "
            "every rank must run the same model on the same kind of inputs"
        )
    return everyone, names[0]


def gather_input_lengths(domain: Domain, local: dict[str, int] | None, error: BaseException | None) -> dict[str, int]:
    """Global length of each sharded graph input, from every rank's ``local`` lengths (one all_gather_object).

    Raises the same :class:`FxHaloError` on every rank if a rank failed, the ranks
    shard different inputs, or an input's shards do not follow the partition rule.
    """
    everyone, names = _sharded_inputs(domain, {"error": _error_text(error), "lengths": local}, error)
    out = {}
    for name in names:
        lengths = [e["lengths"][name] for e in everyone]
        check_partition(lengths, domain, f"graph input '{name}'")
        out[name] = sum(lengths)
    return out


def gather_mesh_input_lengths(mesh: MeshDomain, local: dict | None, error: BaseException | None) -> dict:
    """:func:`gather_input_lengths` on a mesh of several axes: ``local`` holds, per sharded input, one local
    length per axis (``None`` where the axis does not shard it); returns one global length per axis.

    One all_gather_object over the whole domain.  Along each axis the blocks must follow
    the partition rule, and every line of ranks along the axis must hold the same rows
    (a grid of blocks): checked against the line through coordinate 0 of the other axes,
    so that every rank raises the same error.
    """
    coords = tuple(a.rank for a in mesh.axes)
    mine = {"error": _error_text(error), "lengths": local, "coords": coords}
    everyone, names = _sharded_inputs(mesh.whole, mine, error)
    out = {}
    for name in names:
        per_axis = []
        for k, axis in enumerate(mesh.axes):
            entries = [(e["coords"], e["lengths"][name][k]) for e in everyone]
            if any(n is None for _, n in entries):
                if any(n is not None for _, n in entries):
                    raise FxHaloError(f"graph input '{name}' is sharded along mesh axis {k} on some ranks only")
                per_axis.append(None)
                continue
            line = sorted((c[k], n) for c, n in entries if all(c[j] == 0 for j in range(len(coords)) if j != k))
            length = sum(n for _, n in line)
            want = axis.lengths(length)
            for c, n in entries:
                if n != want[c[k]]:
                    raise FxHaloError(
                        f"graph input '{name}': the rank at mesh coordinate {c} holds {n} rows along dim "
                        f"{axis.shard_dim}, but the partition rule splits {length} rows over mesh axis {k}'s "
                        f"{axis.size} ranks as {list(want)}; every rank at coordinate i of that axis holds block i. "
                        "Shard each dim with fxhalo.Domain.bounds() of its axis."
                    )
            per_axis.append(length)
        out[name] = tuple(per_axis)
    return out


def _axes_text(key, value):
    """Kernel axes and groups without their group names: ranks of different lines of a mesh name their axis
    groups differently, and compile the same thing (a group is compared by its size)."""
    if isinstance(value, tuple) and value and all(isinstance(a, ShardAxis) for a in value):
        return tuple((a.dim, a.global_length) for a in value)
    if key == "group_name" and isinstance(value, str):
        return f"a group of {dist.get_world_size(dist.distributed_c10d._resolve_process_group(value))} ranks"
    return value


def fingerprint(gm: torch.fx.GraphModule) -> list[str]:
    """What this rank compiled: input global shapes and layouts, then every inserted kernel
    (each of which runs the graph's collectives) with its settings and input shapes."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            entries = layout_of(n).axes if isinstance(layout_of(n), Layout) else ()
            dims = [s.dim for s in entries if isinstance(s, Sharded)]
            layout = f"sharded along dims {dims}" if dims else "replicated"
            out.append(f"input {n.name} {_shape(n)} {layout}")
        elif n.op == "call_function" and getattr(n.target, "__module__", "").startswith("fxhalo."):
            shapes = [_shape(a) for a in n.all_input_nodes]
            kwargs = sorted((k, _axes_text(k, v)) for k, v in n.kwargs.items())
            out.append(f"{n.target.__module__}.{n.target.__name__} {n.name} {shapes} {kwargs}")
    return out


def check_agreement(domain: Domain, summary: list[str] | None, error: BaseException | None) -> None:
    """Raise the same FxHaloError on every rank if any rank failed or the ranks' graphs differ."""
    everyone = _everyone(domain, {"error": _error_text(error), "summary": summary})
    _raise_first_error(everyone, error)
    reference = everyone[0]["summary"]
    for r, theirs in enumerate(everyone[1:], start=1):
        if theirs["summary"] != reference:
            a, b = reference, theirs["summary"]
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first = a[i] if i < len(a) else "<end of graph>"
            second = b[i] if i < len(b) else "<end of graph>"
            raise FxHaloError(
                f"ranks compiled different graphs, which would hang the job. First difference, at "
                f"entry {i}: rank 0 has '{first}', rank {r} has '{second}'. Every rank must see the same "
                "inputs (sharded by the partition rule) and take the same graph breaks."
            )
