"""FusedLinear: nn.Linear followed by an activation, as one fused op."""

from torch import nn

from .. import functional as F
from ..ops import check_activation


class FusedLinear(nn.Linear):
    """``activation(nn.Linear(in_features, out_features, bias)(x))`` in one fused op.

    A drop-in for nn.Linear (it is one): same parameters, initialisation and state_dict keys, so a
    state_dict loads in both directions. ``activation`` is "none", "relu", "gelu" (exact erf, as
    nn.GELU()), "gelu_tanh" (as nn.GELU(approximate="tanh")) or "silu".
    """

    def __init__(self, in_features, out_features, bias=True, activation="relu", device=None, dtype=None):
        check_activation(activation, "FusedLinear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input):
        return F.linear_act(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"
