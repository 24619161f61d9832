"""Graph passes.  Each is ``(gm, ctx) -> int``: it edits ``gm`` in place and returns a count of what it changed."""

from . import known_layouts
from .context import PassContext
from .propagate import propagate_sharding
from .rewrite import rewrite

__all__ = ["PassContext", "known_layouts", "propagate_sharding", "rewrite"]
