"""Measurements for fxhalo (docs/performance.md): ``python -m benchmarks.run --help``.

Not part of the installed package: run it from the repository root.  See
``docs/performance.md`` for what each row and figure means.
"""
