"""Dropout: a drop-in for torch.nn.Dropout whose CPU training path is fastmlp's dropout op."""

import torch
from torch import nn

from ..functional import dropout
from .linear import _not_scriptable, _traced_as_root


def _dropout_of(module, input):
    """The module's dropout of input, with its p and training flag read when called. In a torch.fx
    graph this is one call (see linear.py) taking the module itself (a get_attr node), so a traced
    model follows .train() / .eval() as nn.Dropout (an FX leaf module) does; a flag passed as an
    argument would be frozen at its value at trace time."""
    return dropout(input, module.p, module.training, module.inplace)


torch.fx.wrap("_dropout_of")
torch.fx.wrap("dropout")

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """torch.nn.Dropout (same arguments, repr, no state) with fastmlp.functional.dropout as its
    forward: in training on the CPU, a mask computed in parallel and not saved for the backward."""

    def forward(self, input):
        if _traced_as_root(self, input):
            return dropout(input, self.p, self.training, self.inplace)
        return _dropout_of(self, input)

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)
