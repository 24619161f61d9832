"""Model factories for tests and for ``python -m fxhalo explain tests/models.py:small_unet``."""

from fxhalo.models import SmallUNet, small_unet  # noqa: F401
