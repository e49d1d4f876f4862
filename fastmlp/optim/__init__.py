"""Fused optimizers: drop-ins for torch.optim.AdamW, Adam and SGD over fastmlp's multi-tensor ops."""

from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
