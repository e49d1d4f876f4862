"""FusedLinear: nn.Linear followed by an activation, as one fused op."""

import torch
from torch import nn

from ..functional import linear_act
from ..ops import check_activation

# torch.fx.symbolic_trace records the op as one call (as torchvision does for its ops) instead of
# tracing into its input checks, which branch on the input and cannot be traced symbolically.
torch.fx.wrap("linear_act")


def _traced_as_root(module, input):
    """Whether torch.fx.symbolic_trace is tracing module itself as the root, which FX cannot pass as
    an argument to a wrapped function: its forward then calls the functional form with its flags as
    constants of the graph, as a traced torch module on its own does."""
    return isinstance(input, torch.fx.Proxy) and input.tracer.root is module


class FusedLinear(nn.Linear):
    """``activation(nn.Linear(in_features, out_features, bias)(x))`` in one fused op.

    An nn.Linear subclass with the same parameters, initialisation and state_dict keys, so a
    state_dict loads in both directions. ``activation`` is "relu" (the default: a hidden layer),
    "none" (exactly nn.Linear), "gelu" (exact erf, as nn.GELU()), "gelu_tanh" (as
    nn.GELU(approximate="tanh")) or "silu". It comes fourth, where nn.Linear has ``device``: pass
    device and dtype by keyword.
    """

    def __init__(self, in_features, out_features, bias=True, activation="relu", device=None, dtype=None):
        if isinstance(activation, (torch.device, torch.dtype)) or (
                isinstance(activation, str) and activation.split(":")[0] in ("cpu", "cuda", "meta", "mps", "xpu")):
            raise ValueError(
                f"FusedLinear: activation (the 4th argument) got {activation!r}, which looks like a "
                f"{'dtype' if isinstance(activation, torch.dtype) else 'device'}; pass device= and dtype= by keyword "
                "(nn.Linear takes device 4th, FusedLinear takes activation there)")
        check_activation(activation, "FusedLinear")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input):
        return linear_act(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def __prepare_scriptable__(self):
        raise _not_scriptable(self)


def _not_scriptable(module):
    """The error torch.jit.script gets for fastmlp's modules (it calls __prepare_scriptable__ on each)."""
    return RuntimeError(
        f"torch.jit.script does not support fastmlp's {type(module).__name__} (TorchScript is deprecated "
        "by torch): use torch.compile, torch.export or torch.jit.trace, which do")
