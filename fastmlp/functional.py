"""Functional forms of the fused ops (like torch.nn.functional)."""

import torch

from . import ops

__all__ = ["linear_act"]


def linear_act(input, weight, bias=None, activation="relu"):
    """act(input @ weight.T + bias) in one fused op, with a fused backward.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features) or None;
    activation: "none", "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "silu".
    Same result as ``act(torch.nn.functional.linear(input, weight, bias))``.
    """
    save = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return ops.linear_act_forward(input, weight, bias, activation, save)[0]
