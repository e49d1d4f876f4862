"""Drop-in modules built on the fused ops."""

from .convert import convert
from .linear import FusedLinear

__all__ = ["FusedLinear", "convert"]
