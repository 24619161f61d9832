"""Graph passes.  Each is ``(gm, ctx) -> int``: it edits ``gm`` in place and returns a count of what it changed."""

from .context import PassContext
from .sharding import propagate_sharding
from .rewrite import rewrite
from . import layouts

__all__ = ["PassContext", "layouts", "propagate_sharding", "rewrite"]
