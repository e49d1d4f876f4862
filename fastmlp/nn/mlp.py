"""MLP: a multi-layer perceptron from a width list, on fused layers or on plain torch modules."""

import math
import numbers
import operator
from collections import OrderedDict

import torch
from torch import nn

from .dropout import Dropout
from .linear import FusedLinear
from .norm import BatchNorm1d, LayerNorm

__all__ = ["MLP"]


def _samples_as_rows(input, in_features):
    """input (N, d1, d2, ...) as (N, d1 * d2 * ...): one row per sample (images (N, 1, 28, 28) ->
    (N, 784)); 1-D and 2-D inputs as they are."""
    if input.dim() <= 2:
        return input
    per_sample = math.prod(input.shape[1:])
    if per_sample != in_features:
        raise ValueError(
            f"MLP: an input of more than 2 dimensions is flattened to one row per sample, and a sample of "
            f"shape {list(input.shape[1:])} has {per_sample} values where widths[0] = {in_features}; "
            "for an MLP applied along the last dimension of (*, features) inputs, use an nn.Sequential "
            "of fastmlp.FusedLinear layers")
    return input.flatten(1)


# A function call in torch.fx graphs: its branches on the input's shape cannot be traced symbolically.
torch.fx.wrap("_samples_as_rows")

_TORCH_ACT = {
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
}
_NORMS = (None, "none", "batch", "layer")
_IMPLS = ("fastmlp", "torch")


def _widths(widths):
    """widths as a list of Python ints (numpy and 0-dim tensor ints too), or a ValueError."""
    bad = ValueError(f"MLP: widths must list at least two positive ints (input, ..., output), got {widths!r}")
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise bad
    out = []
    for w in widths:
        if isinstance(w, bool):
            raise bad
        try:
            w = operator.index(w)
        except TypeError:
            raise bad from None
        if w <= 0:
            raise bad
        out.append(w)
    if len(out) < 2:
        raise bad
    return out


class MLP(nn.Sequential):
    """``widths[0] -> widths[1] -> ... -> widths[-1]``: each hidden block is linear, activation,
    optional norm, optional dropout; the last block is a bare linear layer (logits).

    impl="fastmlp" fuses linear and activation into one FusedLinear (the activation slot holds an
    nn.Identity) and uses fastmlp.nn.BatchNorm1d / LayerNorm and Dropout; impl="torch" uses nn.Linear
    followed by the nn activation module, and torch's norms and nn.Dropout. Both build their
    parameters in the same order with the same initialisation and have the same state_dict keys
    (``{i}.linear.weight``, ``{i}.norm.weight``...), so with one seed they are the same model and
    checkpoints move between them.

    The norm sits after the activation so that linear and activation stay one fused op.
    Inputs with more than two dimensions are flattened after the batch dimension.
    """

    def __init__(self, widths, activation="relu", dropout=0.0, norm=None, bias=True, impl="fastmlp",
                 device=None, dtype=None):
        widths = _widths(widths)
        if activation not in ("relu", "gelu", "gelu_tanh", "silu"):  # "none" would make it one linear map
            raise ValueError(f"MLP: activation must be 'relu', 'gelu', 'gelu_tanh' or 'silu', got {activation!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be a number in [0, 1), got {dropout!r}")
        if norm not in _NORMS:
            raise ValueError(f"MLP: norm must be None, 'batch' or 'layer', got {norm!r}")
        if impl not in _IMPLS:
            raise ValueError(f"MLP: impl must be 'fastmlp' or 'torch', got {impl!r}")
        kw = {"device": device, "dtype": dtype}
        blocks = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            parts = OrderedDict()
            if impl == "fastmlp":
                parts["linear"] = FusedLinear(fan_in, fan_out, bias=bias, activation="none" if last else activation, **kw)
            else:
                parts["linear"] = nn.Linear(fan_in, fan_out, bias=bias, **kw)
            if not last:
                parts["act"] = nn.Identity() if impl == "fastmlp" else _TORCH_ACT[activation]()
                if norm == "batch":
                    parts["norm"] = (BatchNorm1d if impl == "fastmlp" else nn.BatchNorm1d)(fan_out, **kw)
                elif norm == "layer":
                    parts["norm"] = (LayerNorm if impl == "fastmlp" else nn.LayerNorm)(fan_out, **kw)
                if dropout:
                    parts["dropout"] = Dropout(float(dropout)) if impl == "fastmlp" else nn.Dropout(float(dropout))
            blocks.append(nn.Sequential(parts))
        super().__init__(*blocks)
        self.widths, self.activation, self.impl = widths, activation, impl
        self.dropout, self.norm = float(dropout), None if norm == "none" else norm

    def __getitem__(self, idx):
        """A block, or for a slice an MLP of those blocks (the same modules, keeping their names, as
        nn.Sequential's slices do): ``mlp[:-1]`` is the model without its head, whose widths end at
        the last hidden layer's."""
        if not isinstance(idx, slice):
            return super().__getitem__(idx)
        part = type(self).__new__(type(self))
        nn.Sequential.__init__(part, OrderedDict(list(self._modules.items())[idx]))
        blocks = list(part)
        part.widths = [blocks[0].linear.in_features] + [b.linear.out_features for b in blocks] if blocks else []
        part.activation, part.impl, part.dropout, part.norm = self.activation, self.impl, self.dropout, self.norm
        return part

    def forward(self, input):
        if not self.widths:   # an empty slice, as an empty nn.Sequential
            return input
        return super().forward(_samples_as_rows(input, self.widths[0]))

    def linears(self):
        """[(name, linear)] in forward order: the layers init functions and monitors act on."""
        return [(f"{name}.linear", block.linear) for name, block in self._modules.items()]

    def extra_repr(self):
        return f"widths={self.widths}, activation={self.activation!r}, impl={self.impl!r}"
