"""Dropout: a drop-in for torch.nn.Dropout whose CPU training path is fastmlp's dropout op."""

from torch import nn

from ..functional import dropout
from .linear import _not_scriptable

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """torch.nn.Dropout (same arguments, repr, no state) with fastmlp.functional.dropout as its
    forward: in training on the CPU, a mask computed in parallel and not saved for the backward."""

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace)

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)
