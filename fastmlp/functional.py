"""Functional forms of the fused ops (like torch.nn.functional)."""

import torch
import torch.nn.functional as F

from . import ops
from .ops import _FLOATING

__all__ = ["dropout", "linear_act"]

_SEED_RANGE = 2**62


def linear_act(input, weight, bias=None, activation="relu"):
    """act(input @ weight.T + bias) in one fused op, with a fused backward.

    input: (*, in_features); weight: (out_features, in_features); bias: (out_features) or None;
    activation: "none", "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "silu".
    Same result as ``act(torch.nn.functional.linear(input, weight, bias))``.
    """
    if isinstance(bias, str):
        raise TypeError(f"linear_act: bias must be a Tensor or None, got the string {bias!r}; the activation is "
                        f"the 4th argument: linear_act(input, weight, bias, activation={bias!r}) or "
                        f"linear_act(input, weight, activation={bias!r})")
    if input.layout != torch.strided or weight.layout != torch.strided:
        raise TypeError(f"linear_act: input and weight must be dense tensors, got input.layout={input.layout} and "
                        f"weight.layout={weight.layout}; call .to_dense() first")
    # save_for_backward=False: the C++ autograd kernel turns it on when a gradient can flow, so
    # inference skips writing the pre-activation.
    return ops.linear_act_forward(input, weight, bias, activation, False)[0]


def dropout(input, p=0.5, training=True, inplace=False):
    """Same arguments and result distribution as ``torch.nn.functional.dropout``.

    In training on the CPU (0 < p < 1) the mask comes from the fastmlp.dropout op: a counter-based
    hash of each element's index and a seed drawn from torch's default generator (so
    ``torch.manual_seed`` reproduces it), computed in parallel and regenerated in the backward
    instead of saved. ``inplace=True`` writes that result into ``input`` and returns it: the same
    mask as ``inplace=False`` for one seed, as torch's. Under torch.compile the seed's draw is part
    of the graph, so every call of the compiled model draws a new mask. Everywhere else (CUDA,
    p = 0 or 1, integer inputs) this is torch's dropout.
    """
    if training and 0.0 < p < 1.0 and input.device.type == "cpu" and input.dtype in _FLOATING:
        seed = torch.randint(0, _SEED_RANGE, (), dtype=torch.int64, device="cpu")
        out = ops.dropout(input, float(p), seed)
        # (The op saves nothing of input, so overwriting it leaves the backward intact; a leaf that
        # requires grad is refused by copy_ as by torch's in-place dropout.)
        return input.copy_(out) if inplace else out
    return F.dropout(input, p, training, inplace)
