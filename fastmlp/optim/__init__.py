"""Fused optimizers: drop-ins for torch.optim.AdamW, Adam and SGD over fastmlp's multi-tensor ops;
and EMA, a moving average of a model's weights."""

from .adam import Adam, AdamW
from .ema import EMA
from .sgd import SGD

__all__ = ["Adam", "AdamW", "EMA", "SGD"]
