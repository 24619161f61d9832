"""``python -m fxhalo``: command-line tools.

::

    python -m fxhalo explain fxhalo.models:small_unet --input-shape 1,1,128,128 --world-size 4
    python -m fxhalo explain tests/models.py:small_unet --input-shape 1,4,128,128 --world-size 8 \\
        --rank 3 -k in_channels=4 --json
    python -m fxhalo explain fxhalo.models:small_unet --input-shape 1,1,128,128 --world-size 2x2 --shard-dim 2,3

``explain`` builds the model from ``MODULE:FACTORY`` (a dotted module or a ``.py``
file, and a function or class in it, called with the ``-k`` keyword arguments),
makes a random input of the *global* ``--input-shape``, keeps rank ``--rank``'s
slab of it along ``--shard-dim`` (on a mesh, ``--world-size 2x2 --shard-dim 2,3``: its
block), and prints :func:`fxhalo.explain` for that rank.
One process, no process group.  The exit status is 1 when the backend would
refuse the model, so the command can guard a CI job.

(The demo is a separate module: ``python -m fxhalo.demo``.)
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys

import torch

import fxhalo

from .errors import FxHaloError

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1,4,128,128, got {text!r}") from None


def _kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: keep it as a string ("bilinear")


def load_factory(spec: str):
    """``MODULE:FACTORY`` -> the object; MODULE is a dotted module or a path to a ``.py`` file."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise FxHaloError(f"expected MODULE:FACTORY (e.g. fxhalo.models:small_unet), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise FxHaloError(f"no such file: {module_name}")
        name = "_fxhalo_cli_" + os.path.splitext(os.path.basename(path))[0]
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise FxHaloError(f"{module_name} has no attribute {attr!r}") from None


def _local_slab(shape: tuple[int, ...], shard_dims: tuple[int, ...], mesh: tuple[int, ...]) -> tuple[int, ...]:
    """The local block's shape: each of ``shard_dims`` split evenly over its mesh axis's ranks."""
    if len(shard_dims) != len(mesh):
        raise FxHaloError(
            f"--shard-dim {','.join(map(str, shard_dims))} names {len(shard_dims)} dims for a mesh of "
            f"{len(mesh)} axes (--world-size {'x'.join(map(str, mesh))}): give one dim per axis"
        )
    local = list(shape)
    for shard_dim, size in zip(shard_dims, mesh):
        dim = shard_dim + len(shape) if shard_dim < 0 else shard_dim
        if not 0 <= dim < len(shape):
            raise FxHaloError(f"--shard-dim {shard_dim} does not exist on the {len(shape)}-D input {shape}")
        if shape[dim] % size:
            raise FxHaloError(f"the input's dim {dim} ({shape[dim]}) does not split evenly over {size} ranks")
        local[dim] //= size
    return tuple(local)


def _explain_command(args) -> int:
    factory = load_factory(args.target)
    torch.manual_seed(args.seed)
    model = factory(**dict(args.kwarg))
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise FxHaloError(f"{args.target} returned {type(model).__name__}, not a module")
    dtype = getattr(torch, args.dtype)
    local = _local_slab(args.input_shape, args.shard_dim, args.world_size)
    x = torch.randn(local, dtype=dtype)
    if isinstance(model, torch.nn.Module):
        model = model.to(dtype)
    one_axis = len(args.world_size) == 1  # else a mesh: one dim per axis (docs/mesh.md)
    options = {"shard_dim": args.shard_dim[0] if one_axis else args.shard_dim}
    if args.fallback:
        options["fallback"] = args.fallback
    world_size = args.world_size[0] if one_axis else args.world_size
    with torch.set_grad_enabled(not args.no_grad):
        ex = fxhalo.explain(model, x, world_size=world_size, rank=args.rank, **options)
    if args.json:
        print(json.dumps(ex.to_dict(), indent=2))
    else:
        print(
            f"{args.target}: global input {tuple(args.input_shape)}, local input {local} on rank "
            f"{args.rank} of {'x'.join(map(str, args.world_size))}\n"
        )
        print(ex)
        if args.graph and ex.graph is not None:
            print()
            print(ex.graph.code)
    return 1 if ex.problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxhalo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "explain",
        help="print what the domain_parallel backend does to a model on one rank",
        description="Print the fxhalo.explain table and summary for one simulated rank.",
    )
    p.add_argument(
        "target", metavar="MODULE:FACTORY", help="e.g. fxhalo.models:small_unet or tests/models.py:small_unet"
    )
    p.add_argument(
        "--input-shape",
        type=_ints,
        required=True,
        help="GLOBAL input shape, e.g. 1,4,128,128; each rank gets 1/world-size of it along --shard-dim",
    )
    p.add_argument(
        "--world-size",
        type=_ints,
        required=True,
        help="ranks, or a mesh's shape such as 2x2 (then --shard-dim names one dim per axis, e.g. 2,3)",
    )
    p.add_argument("--rank", type=int, default=0, help="the rank (on a mesh: flat, row-major)")
    p.add_argument("--shard-dim", type=_ints, default=(2,), help="the sharded dim, or one per mesh axis: 2,3")
    p.add_argument(
        "-k",
        "--kwarg",
        type=_kwarg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the factory (Python literal), repeatable",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--fallback", choices=("gather",), help="the backend's fallback option")
    p.add_argument("--no-grad", action="store_true", help="explain inference (no backward collectives)")
    p.add_argument("--graph", action="store_true", help="also print the rewritten graph's code")
    p.add_argument("--json", action="store_true", help="print Explanation.to_dict() as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return _explain_command(args)
    except FxHaloError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
