"""Random convolution configurations and the per-case check used by the conv sweep."""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn

from tests.harness import check_against_one_device, check_many_against_one_device

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclasses.dataclass(frozen=True)
class ConvCase:
    nd: int
    shard_dim: int
    in_ch: int
    out_ch: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    padding: object
    padding_mode: str
    groups: int
    bias: bool
    batch: int
    local: tuple  # local spatial shape

    def module(self) -> nn.Module:
        return _CONV[self.nd](
            self.in_ch,
            self.out_ch,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias,
            self.padding_mode,
        )

    def global_shape(self, world_size: int) -> tuple:
        spatial = list(self.local)
        spatial[self.shard_dim - 2] *= world_size
        return (self.batch, self.in_ch, *spatial)

    def local_shape(self) -> tuple:
        return (self.batch, self.in_ch, *self.local)

    @property
    def category(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else "explicit"
        return f"{self.nd}d pad={pad} mode={self.padding_mode}"

    def halo_reach(self) -> int:
        """Rows of the sharded axis one output row reads beyond its own (for multi-hop tagging)."""
        a = self.shard_dim - 2
        return self.dilation[a] * (self.kernel[a] - 1)


def _valid(case: ConvCase, world_size: int) -> bool:
    """Let torch judge: the conv must run on the local slab (what Dynamo traces) and the global tensor,
    and the global output must split evenly over the ranks."""
    try:
        with torch.no_grad():
            m = case.module()
            m(torch.zeros(case.local_shape()))
            out = m(torch.zeros(case.global_shape(world_size)))
    except RuntimeError:
        return False
    return out.shape[case.shard_dim] % world_size == 0


def random_cases(n: int, world_size: int, seed: int = 0) -> list[ConvCase]:
    rng = random.Random(seed * 1000 + world_size)
    cases = []
    while len(cases) < n:
        nd = rng.choice([1, 2, 2, 3])
        shard_dim = 2 if nd == 1 or rng.random() < 0.75 else rng.randint(2, nd + 1)
        kernel = tuple(rng.randint(1, 5) for _ in range(nd))
        stride = tuple(rng.choice([1, 1, 2, 3]) for _ in range(nd))
        dilation = tuple(rng.choice([1, 1, 2, 3]) for _ in range(nd))
        kind = rng.choice(["int", "tuple", "same", "valid", "int"])
        if kind == "same":
            stride = (1,) * nd
            padding = "same"
        elif kind == "valid":
            padding = "valid"
        elif kind == "int":
            padding = rng.randint(0, 3)
        else:
            padding = tuple(rng.randint(0, 3) for _ in range(nd))
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        groups_kind = rng.choice(["one", "one", "depthwise", "two"])
        if groups_kind == "depthwise":
            in_ch = rng.randint(1, 4)
            out_ch, groups = in_ch * rng.choice([1, 2]), in_ch
        elif groups_kind == "two":
            in_ch, out_ch, groups = 2 * rng.randint(1, 2), 2 * rng.randint(1, 2), 2
        else:
            in_ch, out_ch, groups = rng.randint(1, 3), rng.randint(1, 3), 1
        small = 4 if nd == 3 else 7
        local = [rng.randint(3, small) for _ in range(nd)]
        local[shard_dim - 2] = rng.choice([1, 2, 2, 3, 4, 6, 8]) * (stride[shard_dim - 2] if rng.random() < 0.7 else 1)
        case = ConvCase(
            nd,
            shard_dim,
            in_ch,
            out_ch,
            kernel,
            stride,
            dilation,
            padding,
            mode,
            groups,
            rng.random() < 0.7,
            rng.choice([1, 2]),
            tuple(local),
        )
        if _valid(case, world_size):
            cases.append(case)
    return cases


def run_case(case: ConvCase, rank: int, world_size: int, compiler, seed: int) -> dict:
    """Compile ``case`` with domain_parallel and compare with one device; returns the errors."""
    torch.manual_seed(seed)
    m = case.module()
    x = torch.randn(case.global_shape(world_size))
    checks = check_against_one_device(m, x, shard_dim=case.shard_dim, options={"compiler": compiler}, seed=seed)
    return {
        "ok": all(ok for ok, _ in checks.values()),
        "max_err": max(err for _, err in checks.values()),
        "failed": [k for k, (ok, _) in checks.items() if not ok],
    }


def _summary(checks: dict) -> dict:
    return {
        "ok": all(ok for ok, _ in checks.values()),
        "max_err": max(err for _, err in checks.values()),
        "failed": [k for k, (ok, _) in checks.items() if not ok],
    }


def run_cases(cases: list[ConvCase], rank: int, world_size: int, compiler, seeds: list[int]) -> list[dict]:
    """:func:`run_case` for many cases of one ``shard_dim``, compiled as one graph; the same data and checks."""
    (shard_dim,) = {case.shard_dim for case in cases}
    batch = []
    for case, seed in zip(cases, seeds):
        torch.manual_seed(seed)
        m = case.module()
        batch.append((m, torch.randn(case.global_shape(world_size)), seed))
    checks = check_many_against_one_device(batch, shard_dim=shard_dim, options={"compiler": compiler})
    return [_summary(c) for c in checks]
