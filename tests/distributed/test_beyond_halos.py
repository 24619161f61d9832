"""Ops that need more than a halo along the sharded dim, on DomainTensors, against one device.

One spawn of 4 gloo ranks runs every case on groups of 2 and 4 ranks and every fifth case
(and the FNO block) on 3 (the sub-groups' other ranks wait at a barrier), uneven rows
throughout and arbitrary partitions on 4; all cases of a rank count are compiled as one
graph (``check_many_global_view``):

- scans along the shard (``cumsum``, ``cumprod``, ``logcumsumexp``, ``cummax``, ``cummin``,
  ties included): ``out`` wrong points at the prefix of the ranks before (or its order),
  ``grad_in`` wrong with ``out`` right at the gather's backward;
- matrix products with the shard on a row or batch dim, and ``F.prelu`` (channel weight):
  local, their weight gradients summed over the ranks;
- Fourier transforms over the shard (every ``torch.fft`` op with ``s=``, ``dim=``, ``norm=``,
  on 1-D, 2-D and 3-D transforms): ``out`` wrong points at the plan (the order of the
  one-dimensional transforms, the carrier), ``grad_in`` at the move's backward; an FNO
  block of our own (tests/beyond_models.py): rfft2, low modes mixed over channels by
  ``einsum`` and written into a zero buffer, irfft2;
- attention over the H*W tokens (tests/beyond_models.py): the heads kernel and the gathered
  keys, causal, grouped-query, with key-padding, query-sharded and replicated masks;
  dropout in it is refused;
- contractions of the shard: a token-mixing MLP (``Linear`` over the tokens), an
  ``einsum``/``matmul`` basis transform over the latitude, a chain of products summed once
  and a partial sum reduce-scattered onto the sharded input (tests/beyond_models.py);
- CrossFormer's long-range windows (each window's rows strided over the map): the queries and
  keys moved onto the window index for the products, or the rows regrouped before the split;
- ``fxhalo.redistribute(x, dim)`` on DomainTensors, in a model and eagerly;
- an FFT with no dim to carry the shard is refused on every rank.

Each case is compiled in the global view (``check_many_global_view``), with ``aot_eager`` on 2 ranks
and ``eager`` on more (``tests.harness.sweep_compiler``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.beyond_models import ContractChain, ContractScatter, FNOBlock, LongRangeWindows, TokenAttention
from tests.harness import by_world_size, check_many_global_view, failed_by_world_size, spawned_once
from tests.passes.graphs import Lambda

WORLD_SIZES = (2, 3, 4)


def _extreme_sum(scan, dim):
    """Values plus indices of a running extreme: a wrong index shows in the output."""

    def fn(x):
        values, indices = scan(x, dim)
        return values + indices.to(values.dtype)

    return fn


SCANS = {
    "cumsum": lambda x: torch.cumsum(x, 2),
    "cumsum method, dtype float64": lambda x: x.cumsum(2, dtype=torch.float64).float(),
    "cumprod": lambda x: torch.cumprod(1 + 0.1 * x, dim=2),
    "logcumsumexp, negative dim": lambda x: torch.logcumsumexp(x, -2),
    "cummax values + indices": _extreme_sum(torch.cummax, 2),
    "cummin values + indices, ties": lambda x: _extreme_sum(torch.cummin, 2)(x.clamp(-0.3, 0.3)),
    "cummax with ties, method": lambda x: x.clamp(-0.3, 0.3).cummax(2).values,
    "cumsum along W: local": lambda x: x.cumsum(3),
    "cummax along W: local": lambda x: torch.cummax(x, 3)[0],
}


class TokenMatmul(nn.Module):
    """Tokens (sharded rows) times a weight, then a per-window batched product: both local."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6) / 3)
        self.v = nn.Parameter(torch.randn(1, 6, 4) / 3)

    def forward(self, x):  # x: [B, C, H, W] sharded along H
        t = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)  # [B, H, C*W]: H = tokens
        t = t[..., :5] @ self.w  # rows of a sharded, b replicated
        return torch.matmul(t.unsqueeze(2), self.v).squeeze(2)  # a batch dim sharded, v broadcast


class PReLUBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4)

    def forward(self, x):
        return self.act(self.conv(x))


def _real(t):
    return torch.view_as_real(t.resolve_conj())


#: FFTs of a [B, C, H, W] field sharded along H: over the shard, with s=, dim= and norm=
FFTS_2D = {
    "fft along H": lambda x: _real(torch.fft.fft(x, dim=2)),
    "ifft along H, n padded, ortho": lambda x: _real(torch.fft.ifft(x, n=x.shape[2] + 2, dim=2, norm="ortho")),
    "rfft along H, forward norm": lambda x: _real(torch.fft.rfft(x, dim=-2, norm="forward")),
    "irfft along H": lambda x: torch.fft.irfft(x, dim=2),
    "hfft along H": lambda x: torch.fft.hfft(x, dim=2),
    "ihfft along H": lambda x: _real(torch.fft.ihfft(x, dim=2)),
    "rfft2 -> irfft2 with s": lambda x: torch.fft.irfft2(torch.fft.rfft2(x) * 2, s=x.shape[-2:]),
    "fft2 over (W, H)": lambda x: _real(torch.fft.fft2(x, dim=(3, 2))),
    "ifft2 with s padded": lambda x: _real(torch.fft.ifft2(x, s=(x.shape[2] + 3, 8))),
    "rfft2 with H the real dim": lambda x: _real(torch.fft.rfft2(x, dim=(3, 2))),
    "irfft2 with H the real dim": lambda x: torch.fft.irfft2(x, dim=(3, 2), norm="ortho"),
    "fftn over C, H, W": lambda x: _real(torch.fft.fftn(x, dim=(1, 2, 3))),
    "ifftn over every dim": lambda x: torch.view_as_complex(_real(torch.fft.ifftn(x))).real,
    "rfftn with s": lambda x: _real(torch.fft.rfftn(x, s=(x.shape[2], 8))),
    "irfftn(rfftn) over H, W": lambda x: torch.fft.irfftn(torch.fft.rfftn(x, dim=(2, 3)), dim=(2, 3)),
    "fft of W only: local": lambda x: torch.fft.fft(x, dim=3).imag,
    "fftshift / ifftshift over H": lambda x: torch.fft.ifftshift(torch.fft.fftshift(x, dim=(2, 3)) * 2, dim=2),
    # a complex value's halo travels as its real view (gloo's collectives take no complex tensors)
    "fftshift of a complex spectrum over H": lambda x: _real(torch.fft.fftshift(torch.fft.fft(x, dim=3), dim=2)),
}
#: FFTs of a [B, C, L] signal sharded along L (the shard moves to the batch or the channels)
FFTS_1D = {
    "1-D: rfft -> irfft along L": lambda x: torch.fft.irfft(torch.fft.rfft(x) * 2, n=x.shape[-1]),
    "1-D: fft along L, backward norm": lambda x: _real(torch.fft.fft(x, norm="backward")),
}
#: FFTs of a [B, C, D, H, W] volume sharded along D
FFTS_3D = {
    "3-D: rfftn over D, H, W": lambda x: _real(torch.fft.rfftn(x, dim=(2, 3, 4))),
    "3-D: irfftn(rfftn) with s": lambda x: torch.fft.irfftn(torch.fft.rfftn(x, dim=(2, 3, 4)), s=x.shape[2:]),
    "3-D: fftn over D, H, ortho": lambda x: _real(torch.fft.fftn(x, dim=(2, 3), norm="ortho")),
}


class TokenMixing(nn.Module):
    """MLP-Mixer's token mixing over a sharded sequence: two Linears along the tokens, a residual."""

    def __init__(self, tokens: int, hidden: int = 5):
        super().__init__()
        self.mix1, self.mix2 = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens)

    def forward(self, x):  # [B, C, T], T sharded
        return x + self.mix2(F.gelu(self.mix1(x)))


class LegendreLike(nn.Module):
    """A transform by a basis over the sharded latitude (einsum contracting H), filtered, and back."""

    def __init__(self, rows: int, modes: int = 4):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(modes, rows) / rows)
        self.gain = nn.Parameter(torch.randn(modes, 1))

    def forward(self, x):  # [B, C, H, W], H sharded
        coeffs = torch.einsum("bchw,lh->bclw", x, self.basis)  # a partial sum on every rank, summed once
        back = torch.einsum("bclw,lh->bchw", coeffs * self.gain, self.basis)
        return x + torch.matmul(x.transpose(2, 3), self.basis.t()).mean() + back


#: attention over the H*W tokens of a field sharded along H: (kwargs of TokenAttention); 4 heads go
#: round on up to 4 ranks (the heads kernel), 2 heads or 1 key/value head do not (gathered keys)
ATTENTION = {
    "heads": {},
    "heads, causal, scale": {"causal": True, "scale": 0.3},
    "gathered keys (2 heads), causal, scale": {"heads": 2, "causal": True, "scale": 0.3},
    "GQA, heads": {"kv_heads": 2},
    "GQA, gathered keys": {"kv_heads": 1},
    "heads, key padding mask": {"mask": "keys"},
    "gathered keys, mask sharded along the queries": {"heads": 2, "mask": "queries"},
    "heads, replicated band mask": {"mask": "distance"},
}


class MovedFFT(nn.Module):
    """A user's own slab FFT along the sharded H: fxhalo.redistribute moves the shard to W first and back
    after, so the transform itself is local."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        import fxhalo

        y = fxhalo.redistribute(self.conv(x), 3)  # H -> W (balanced)
        y = torch.fft.fft(y, dim=2).abs()
        return fxhalo.redistribute(y, 2)  # back to H


def _eager_redistribute(group, x):
    """fxhalo.redistribute on DomainTensors outside a compiled region: the values stay, the shard moves, the
    gradient comes back to the input's rows."""
    import fxhalo

    xs = fxhalo.shard(x, 2, group)
    slab = xs.to_local().detach().requires_grad_()
    xg = fxhalo.from_local(slab, 2, group, lengths=xs.partition, run_check=False)
    y = fxhalo.redistribute(xg, 3, dst_lengths=None)
    ok = y.spec.dim == 3 and torch.equal(fxhalo.gather(y), x)
    (y.to_local() * 2).sum().backward()
    return {"moved": (ok, 0.0), "grad": (torch.equal(slab.grad, torch.full_like(slab, 2.0)), 0.0)}


def _fft_models():
    return {f"fft: {name}": Lambda(fn) for name, fn in FFTS_2D.items()}


def _models():
    models = {f"scan: {name}": Lambda(fn) for name, fn in SCANS.items()}
    models["matmul: tokens @ weight, batched"] = TokenMatmul()
    models["prelu after a conv"] = PReLUBlock()
    return models


def _refused_dropout(group, image):
    import fxhalo

    torch._dynamo.reset()
    x = fxhalo.shard(image, 2, group)
    try:
        torch.compile(TokenAttention(dropout=0.1), backend="domain_parallel", options={"compiler": "aot_eager"})(x)
    except fxhalo.FxHaloError as e:
        return "dropout" in str(e) and "scaled_dot_product_attention" in str(e) and "Remedy" in str(e)
    return False


def _refused_without_carrier(group):
    """An FFT over every dim of a tensor whose other dims are too short to carry the shard."""
    import fxhalo

    torch._dynamo.reset()
    x = fxhalo.shard(torch.randn(1, 1, 9, 1), 2, group)
    try:
        torch.compile(Lambda(torch.fft.fftn), backend="domain_parallel", options={"compiler": "aot_eager"})(x)
    except fxhalo.FxHaloError as e:
        return "no other dim can carry the shard" in str(e) and "Remedy" in str(e) and "fftn" in str(e)
    return False


def _cases(P):
    """name -> (model, global input, partition or None) of every case compared with one device on P ranks."""
    torch.manual_seed(P)  # the same global tensors on every rank
    x, field = torch.randn(2, 3, 4 * P + 1, 5), torch.randn(2, 3, 4 * P + 1, 6)
    signal, volume = torch.randn(2, 4, 4 * P + 1), torch.randn(1, 2, 2 * P + 1, 4, 6)
    image, tokens = torch.randn(1, 8, 2 * P + 1, 3), torch.randn(2, 3, 4 * P + 1)
    cases = {name: (model, x, None) for name, model in _models().items()}
    cases.update({name: (model, field, None) for name, model in _fft_models().items()})
    cases["fno block"] = (FNOBlock(), torch.randn(1, 4, 4 * P + 1, 12), None)
    cases.update({name: (Lambda(fn), signal, None) for name, fn in FFTS_1D.items()})
    cases.update({name: (Lambda(fn), volume, None) for name, fn in FFTS_3D.items()})
    cases.update({f"attention: {name}": (TokenAttention(**kw), image, None) for name, kw in ATTENTION.items()})
    cases["fxhalo.redistribute in a model"] = (MovedFFT(), field, None)
    cases["token-mixing MLP over the shard"] = (TokenMixing(4 * P + 1), tokens, None)
    cases["einsum and matmul contracting the shard"] = (LegendreLike(4 * P + 1), field, None)
    cases["products contracting the shard, summed once"] = (ContractChain(4 * P + 1), tokens, None)
    cases["a partial sum reduce-scattered"] = (ContractScatter(4 * P + 1), tokens, None)
    # 12 rows in 2 strided windows of 6: whole window rows per rank on 2 ranks (the products move the shard
    # onto the windows), rows regrouped before the split on 3 and 4
    cases["long-range windows (CrossFormer)"] = (LongRangeWindows(), torch.randn(1, 4, 12, 4), None)
    if P == 3:  # 3 ranks (an odd count) on a fifth of the cases, to keep the suite's time
        cases = {name: case for i, (name, case) in enumerate(cases.items()) if i % 5 == 0 or "fno" in name}
    if P == 4:
        cases["scan: cumsum, partition [3, 1, 9, 4]"] = (
            Lambda(SCANS["cumsum"]),
            torch.randn(2, 3, 17, 5),
            [3, 1, 9, 4],
        )
        cases["a partial sum reduce-scattered, partition [3, 1, 9, 4]"] = (
            ContractScatter(17),
            torch.randn(2, 3, 17),
            [3, 1, 9, 4],
        )
        cases["fno block, partition [1, 3, 7, 6]"] = (FNOBlock(), torch.randn(1, 4, 17, 12), [1, 3, 7, 6])
        cases["scan: cummax, partition [3, 1, 9, 4]"] = (
            Lambda(SCANS["cummax values + indices"]),
            torch.randn(2, 3, 17, 5),
            [3, 1, 9, 4],
        )
    return cases, field, image


def _run(rank, world_size):
    return by_world_size(rank, world_size, WORLD_SIZES, _check)


def _check(P, group):
    cases, field, image = _cases(P)
    # One compiled graph for every case (compiling is what costs time); a failing batch
    # falls back to one graph per case, so a failure still names its case.
    checks = check_many_global_view(list(cases.values()), group=group)
    res = dict(zip(cases, checks))
    res["attention with dropout: refused"] = {"refused": (_refused_dropout(group, image), 0.0)}
    res["fxhalo.redistribute eagerly"] = _eager_redistribute(group, field)
    res["fft over every dim, nothing to carry the shard: refused"] = {"refused": (_refused_without_carrier(group), 0.0)}
    return {name: {k: ok for k, (ok, _) in checks.items()} for name, checks in res.items()}


@pytest.mark.timeout(430)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_match_one_device(P):
    failures = failed_by_world_size(spawned_once(_run, max(WORLD_SIZES), timeout=400), P)
    assert not failures, failures
