"""Counting what a rank sends: collectives per step and their payload bytes.

Two counters, one per way a row runs:

* **Eager rows** (fxhalo's eager layer, CREDIT): :class:`CountingMode`, a
  ``TorchDispatchMode`` active for one forward + backward.  Every communication op
  reaches the dispatcher, whether functional (``_c10d_functional.all_to_all_single``,
  ``all_reduce``, ...) or c10d (``c10d.send``, ``c10d.recv_``, ``c10d.allreduce_``
  from ``dist.batch_isend_irecv`` / ``dist.all_reduce``), and the backward's ops run
  on the calling thread on CPU, so the mode sees them too.
* **Compiled rows** (``backend="domain_parallel"``): a dispatch mode sees nothing
  inside a compiled graph (we measured: not even with ``aot_eager``).  Instead the
  model is compiled once more, untimed, with fxhalo's ``compiler`` set to
  :func:`counting_compiler`: AOTAutograd's forward and backward graphs (the graphs
  Inductor would receive: fxhalo's kernels traced to ``_c10d_functional`` nodes) are
  tallied from the nodes' ``meta["val"]``, and every *call* of a compiled forward or
  backward adds its graph's tally.  So a graph that runs twice a step counts twice.
  Inductor's own passes do not add, drop or resize collectives on CPU, so the
  Inductor-compiled row sends the same.

**Payload** is what the rank hands to the communication library per call:

=================================  ==========================================
op                                 payload counted
=================================  ==========================================
``all_to_all_single``              the input minus the rank's own split
``send`` / ``recv_``               the tensors sent / nothing
``all_reduce`` (any flavour)       the input (a ring moves 2(P-1)/P of it)
``all_gather_into_tensor``         the input (this rank's contribution)
``reduce_scatter_tensor``          the input
=================================  ==========================================

Calls are split into ``exchange`` (all-to-all, send, recv: halo rows) and
``reduce`` (all-reduce, all-gather, reduce-scatter: statistics).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Tally", "CountingMode", "counting_compiler"]

_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d")
_EXCHANGE = ("all_to_all_single", "send", "recv_", "recv_any_source_", "alltoall_base_", "alltoall_")
_NOT_COMM = ("wait_tensor", "wait", "monitored_barrier_")


@dataclasses.dataclass
class Tally:
    """Calls and payload bytes of one rank, split into ``exchange`` and ``reduce``."""

    calls: dict = dataclasses.field(default_factory=lambda: {"exchange": 0, "reduce": 0})
    bytes: dict = dataclasses.field(default_factory=lambda: {"exchange": 0, "reduce": 0})
    ops: dict = dataclasses.field(default_factory=dict)  # op name -> calls, for the JSON

    def add(self, name: str, nbytes: int, times: int = 1) -> None:
        kind = "exchange" if name in _EXCHANGE else "reduce"
        self.calls[kind] += times
        self.bytes[kind] += nbytes * times
        self.ops[name] = self.ops.get(name, 0) + times

    def merge(self, other: Tally, times: int = 1) -> None:
        for k in self.calls:
            self.calls[k] += other.calls[k] * times
            self.bytes[k] += other.bytes[k] * times
        for name, n in other.ops.items():
            self.ops[name] = self.ops.get(name, 0) + n * times

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "ops": dict(self.ops)}


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(u) for u in t)
    return 0


def _group_rank(group_name) -> int:
    pg = dist.distributed_c10d._resolve_process_group(group_name) if isinstance(group_name, str) else group_name
    return dist.get_rank(pg)


def payload(name: str, args) -> int:
    """Bytes the rank sends for one call of op ``name`` with (real or fake) tensor ``args``."""
    if name == "all_to_all_single":
        x, _out_splits, in_splits, group = args[:4]
        total = _nbytes(x)
        if in_splits and x.shape[0]:
            own = in_splits[_group_rank(group)]
            total -= total // x.shape[0] * own
        return total
    if name.startswith("recv"):
        return 0
    if name in (
        "allgather_",
        "_allgather_base_",
        "reduce_scatter_",
        "_reduce_scatter_base_",
        "alltoall_base_",
        "alltoall_",
        "allgather_into_tensor_coalesced_",
    ):
        return _nbytes(args[1])  # c10d ops: (outputs, inputs, ...)
    return _nbytes(args[0])


def _is_comm(func) -> bool:
    return func.namespace in _NAMESPACES and func._opname not in _NOT_COMM


class CountingMode(TorchDispatchMode):
    """Tally every communication op dispatched while active (eager code only)."""

    def __init__(self):
        super().__init__()
        self.tally = Tally()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_comm(func):
            self.tally.add(func._opname, payload(func._opname, args))
        return func(*args, **(kwargs or {}))


def tally_graph(gm: torch.fx.GraphModule) -> Tally:
    """The communication of one call of an AOTAutograd graph, from its nodes' fake values."""
    tally = Tally()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not _is_comm(target):
            continue
        args = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
        tally.add(target._opname, payload(target._opname, args))
    return tally


def counting_compiler(sink: Tally):
    """An fxhalo ``compiler=`` callable: AOTAutograd without Inductor, adding to ``sink`` per call.

    It partitions forward and backward with Inductor's partitioner (min-cut
    rematerialization, as ``aot_eager`` does): AOTAutograd's default partitioner
    recomputes one halo exchange of SmallUNet in the backward, Inductor's does not, and
    with this one the tallies equal those of Inductor's own graphs (checked on SmallUNet
    by tallying the graphs ``compile_fx`` hands its inner compiler).
    """
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def counted(gm, example_inputs):
        tally = tally_graph(gm)

        def run(*args):
            sink.merge(tally)
            return gm(*args)

        return make_boxed_func(run)

    return aot_autograd(
        fw_compiler=counted,
        bw_compiler=counted,
        partition_fn=min_cut_rematerialization_partition,
        keep_inference_input_mutations=True,
    )
