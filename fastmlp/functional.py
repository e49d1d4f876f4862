"""Functional forms of the fused ops (like torch.nn.functional)."""

from . import ops

__all__ = ["linear_act"]


def linear_act(input, weight, bias=None, activation="relu"):
    """act(input @ weight.T + bias) in one fused op, with a fused backward.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features) or None;
    activation: "none", "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "silu".
    Same result as ``act(torch.nn.functional.linear(input, weight, bias))``.
    """
    # save_for_backward=False: the C++ autograd kernel turns it on when a gradient can flow, so
    # inference skips writing the pre-activation.
    return ops.linear_act_forward(input, weight, bias, activation, False)[0]
