"""Graph passes.  Each is ``(gm, ctx) -> int``: it edits ``gm`` in place and returns a count of what it changed."""

from . import layouts
from .context import PassContext
from .rewrite import rewrite
from .sharding import propagate_sharding

__all__ = ["PassContext", "layouts", "propagate_sharding", "rewrite"]
