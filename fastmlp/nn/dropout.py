"""Dropout: a drop-in for torch.nn.Dropout whose CPU training path is fastmlp's dropout op."""

import torch
from torch import nn

from ..functional import dropout
from .linear import _not_scriptable

# One call in a torch.fx graph (see linear.py). As for any function FX records, the module's
# training flag at trace time is part of the graph.
torch.fx.wrap("dropout")

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """torch.nn.Dropout (same arguments, repr, no state) with fastmlp.functional.dropout as its
    forward: in training on the CPU, a mask computed in parallel and not saved for the backward."""

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace)

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)
