"""Drop-in modules built on the fused ops."""

from .convert import convert
from .dropout import Dropout
from .init import he_, init_, kaiming_, lsuv_, xavier_
from .linear import FusedLinear
from .mlp import MLP
from .norm import BatchNorm1d, LayerNorm

__all__ = ["BatchNorm1d", "Dropout", "FusedLinear", "LayerNorm", "MLP", "convert", "he_", "init_", "kaiming_", "lsuv_", "xavier_"]
