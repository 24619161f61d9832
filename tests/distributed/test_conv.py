"""The convolution sweep: >= 200 random configurations per world size, in one spawned group each.

Each rank builds the same cases, runs one device's reference on the full tensor,
then the domain_parallel-compiled conv on its slab, and compares
- ``out``: the forward slab (a wrong halo width or edge rule shows up here, usually on edge ranks);
- ``grad_in``: the input-gradient slab (a halo gradient not returned to its owner shows up here);
- ``grad_weight`` / ``grad_bias``: partial weight gradients summed over ranks.
Cases of one shard dim are compiled BATCH at a time as one graph (one Dynamo trace and one
backend compile for all of them, which is what costs time); each keeps its own input,
weights, reference and upstream gradient, and is checked and reported on its own.
Rank 0's table groups the cases by dimensionality, padding and padding mode.
"""

from collections import Counter

import pytest
import torch
from tabulate import tabulate

from tests.harness import batches_of, run_ranks, sweep_compiler

N_CASES = 200


#: cases compiled together as one graph (one Dynamo trace and one compile for all of them)
BATCH = 25


def _halo_outputs(gm) -> list[bool] | None:
    """Per graph output: does the rewritten graph compute it through an fxhalo kernel?"""
    outputs = gm.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    flags = []
    for out in outputs:
        seen, stack, found = set(), [out], False
        while stack and not found:
            node = stack.pop()
            if not isinstance(node, torch.fx.Node) or node in seen:
                continue
            seen.add(node)
            module = getattr(node.target, "__module__", "")
            # grad_sync reads every parameter through fxhalo.ops.grad: not an op's kernel
            found = module.startswith("fxhalo.ops") and not module.startswith("fxhalo.ops.grad")
            stack.extend(node.all_input_nodes)
        flags.append(found)
    return flags


def _sweep(rank, world_size, n_cases, compiler, batch=BATCH):
    """Every case, in batches of cases of one shard dim: one compile per batch, a result per case."""
    from fxhalo.backend import _inner
    from tests.distributed.conv_cases import random_cases, run_case, run_cases

    seen = {}

    def recording(gm, example_inputs):  # notes, per output, whether the pass inserted a halo kernel
        seen["rewritten"] = _halo_outputs(gm)
        return _inner(compiler)(gm, example_inputs)

    cases = random_cases(n_cases, world_size)
    results = [None] * len(cases)
    for chunk in batches_of(cases, batch):
        seen.clear()
        rs = run_cases([cases[i] for i in chunk], rank, world_size, recording, seeds=chunk)
        flags = seen.get("rewritten")
        if flags is None or len(flags) != len(chunk):  # the batch ran case by case: one compile each
            flags = []
            for i in chunk:
                seen.clear()
                run_case(cases[i], rank, world_size, recording, seed=i)
                flags.append(any(seen.get("rewritten", ())))
        for i, r, rewritten in zip(chunk, rs, flags):
            case = cases[i]
            r.update(
                category=case.category,
                rewritten=rewritten,
                multi_hop=case.halo_reach() > case.local[case.shard_dim - 2],
                case=repr(case),
            )
            results[i] = r
    return results


def _table(world_size, per_rank):
    """One row per dimensionality, padding kind and padding mode; a case matches if it matched on every rank."""
    counts = {}
    for i, case in enumerate(per_rank[0]):
        ok = all(results[i]["ok"] for results in per_rank)
        nd, pad, mode = case["category"].split()
        for key in (nd, pad, mode):
            row = counts.setdefault(key, Counter())
            row["cases"] += 1
            row["halo exchange"] += case["rewritten"]
            row["proven local"] += not case["rewritten"]
            row["past the neighbour"] += case["rewritten"] and case["multi_hop"]
            row["matched"] += ok
    cols = ["cases", "halo exchange", "proven local", "past the neighbour", "matched"]
    table = [[key] + [counts[key][c] for c in cols] for key in counts]
    table.sort(key=lambda r: r[0])
    total = Counter()
    for key in ("1d", "2d", "3d"):
        total.update(counts.get(key, Counter()))
    table.append(["all"] + [total[c] for c in cols])
    return tabulate(table, headers=[f"P={world_size}"] + cols)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_conv_matches_one_device(world_size):
    per_rank = run_ranks(_sweep, world_size, N_CASES, sweep_compiler(world_size), timeout=540)
    print()
    print(_table(world_size, per_rank))
    n_multi_hop = sum(c["multi_hop"] and c["rewritten"] for c in per_rank[0])
    n_halo = sum(c["rewritten"] for c in per_rank[0])
    failures = [
        (r, c["case"], c["failed"], c["max_err"]) for r, results in enumerate(per_rank) for c in results if not c["ok"]
    ]
    assert not failures, failures[:10]
    assert len(per_rank[0]) >= N_CASES
    assert n_halo > N_CASES // 2 and n_multi_hop > 0
